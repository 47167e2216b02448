{{- define "pgrs.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pgrs.serviceAccountName" -}}
{{- default (include "pgrs.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "pgrs.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "pgrs.labels" -}}
app.kubernetes.io/name: pgrs-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pgrs.selectorLabels" -}}
app.kubernetes.io/name: pgrs-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
