{{/* Name of the chart (nameOverride wins). */}}
{{- define "pycluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the objects: <release>-<chart>, or the release name when it contains it. */}}
{{- define "pycluster.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Selector labels: they must not change between upgrades. */}}
{{- define "pycluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pycluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "pycluster.labels" -}}
{{ include "pycluster.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret holding the NATS URL (and creds). */}}
{{- define "pycluster.natsSecret" -}}
{{- default (printf "%s-nats" (include "pycluster.fullname" .)) .Values.nats.existingSecret }}
{{- end }}

{{/* Whether the NATS creds file is mounted. */}}
{{- define "pycluster.hasCreds" -}}
{{- if .Values.nats.existingSecret }}{{ if .Values.nats.credsFromSecret }}true{{ end }}
{{- else if .Values.nats.creds }}true{{ end }}
{{- end }}
