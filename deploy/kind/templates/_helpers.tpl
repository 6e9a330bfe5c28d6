{{/* Labels of one dependency: include "deps.labels" (dict "root" $ "name" "kafka"). */}}
{{- define "deps.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: lambda-pipeline-deps
{{ include "deps.selector" . }}
{{- end }}

{{/* Selector labels of one dependency (immutable once deployed). */}}
{{- define "deps.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{/* The dev credentials Secret. */}}
{{- define "deps.secret" -}}
lambda-pipeline-deps-credentials
{{- end }}
