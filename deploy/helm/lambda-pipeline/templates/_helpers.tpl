{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "lp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; a release already named after the chart is not repeated. */}}
{{- define "lp.fullname" -}}
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

{{/* Name of one service's objects: dict "root" $ "name" <service>. */}}
{{- define "lp.componentName" -}}
{{- printf "%s-%s" (include "lp.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "lp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lambda-pipeline
{{- end }}

{{/* Selector labels of one service: dict "root" $ "name" <service>. Immutable once deployed. */}}
{{- define "lp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "lp.componentLabels" -}}
{{ include "lp.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "lp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lp.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lp.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
One service's settings: serviceDefaults overlaid with the entry (dict "root" $ "spec" <entry>), as YAML.
mergeOverwrite skips false and 0 in the entry, so explicit booleans are copied by hand.
*/}}
{{- define "lp.serviceConfig" -}}
{{- $merged := mergeOverwrite (deepCopy .root.Values.serviceDefaults) (deepCopy .spec) }}
{{- if hasKey .spec "enabled" }}
{{- $_ := set $merged "enabled" .spec.enabled }}
{{- end }}
{{- if and (hasKey .spec "autoscaling") (hasKey (.spec.autoscaling | default dict) "enabled") }}
{{- $_ := set $merged.autoscaling "enabled" .spec.autoscaling.enabled }}
{{- end }}
{{- if not $merged.module }}
{{- fail (printf "services.%s.module is required (the Python module to run, e.g. services.generator)" .name) }}
{{- end }}
{{- toYaml $merged }}
{{- end }}
