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

{{/* repository@digest when image.digest is set (immutable; what a release pipeline pins), else repository:tag. */}}
{{- define "lp.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
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
{{- range $block := list "autoscaling" "lagAutoscaling" }}
{{- if and (hasKey $.spec $block) (hasKey (get $.spec $block | default dict) "enabled") }}
{{- $_ := set (get $merged $block) "enabled" (get (get $.spec $block) "enabled") }}
{{- end }}
{{- end }}
{{- if and $merged.autoscaling.enabled $merged.lagAutoscaling.enabled }}
{{- fail (printf "services.%s: autoscaling (CPU HPA) and lagAutoscaling (KEDA) are both enabled; one autoscaler per workload" .name) }}
{{- end }}
{{- if not $merged.module }}
{{- fail (printf "services.%s.module is required (the Python module to run, e.g. services.generator)" .name) }}
{{- end }}
{{- toYaml $merged }}
{{- end }}

{{/*
The Secret a workload reads (dict "root" $ "name" <workload> "secret" <its secret block>): existingSecret, else
<fullname>-<workload> (created by the chart only from devSecrets).
*/}}
{{- define "lp.secretName" -}}
{{- .secret.existingSecret | default (include "lp.componentName" (dict "root" .root "name" .name)) }}
{{- end }}

{{/*
Environment entries from a workload's Secret: each key of `secret.env` (a name, or {name, key, optional}) as a
secretKeyRef, the Kafka SASL pair for Kafka clients when the protocol is SASL_*, and for each of `secret.files`
its variable set to the mounted file's path. dict "root" $ "name" <workload> "secret" <block> "kafkaClient" <bool>.
*/}}
{{- define "lp.secretEnv" -}}
{{- $secretName := include "lp.secretName" . }}
{{- $entries := list }}
{{- $named := dict }}
{{- range .secret.env }}
{{- $entry := dict "name" . "key" . "optional" false }}
{{- if not (kindIs "string" .) }}
{{- $entry = dict "name" .name "key" (.key | default .name) "optional" (.optional | default false) }}
{{- end }}
{{- $entries = append $entries $entry }}
{{- $_ := set $named $entry.name true }}
{{- end }}
{{- if and .kafkaClient (hasPrefix "SASL" (.root.Values.config.KAFKA_SECURITY_PROTOCOL | default "PLAINTEXT")) }}
{{- range list "KAFKA_SASL_USERNAME" "KAFKA_SASL_PASSWORD" }}
{{- if not (hasKey $named .) }}
{{- $entries = append $entries (dict "name" . "key" . "optional" false) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $entries }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ .key }}
      optional: {{ .optional }}
{{- end }}
{{- range .secret.files }}
- name: {{ .env }}
  value: {{ printf "%s/%s" (trimSuffix "/" $.secret.mountPath) .key | quote }}
{{- end }}
{{- end }}

{{/* The read-only mount of a workload's key files (same dict as lp.secretEnv); nothing without files. */}}
{{- define "lp.secretFilesMount" -}}
{{- if .secret.files }}
- name: secret-files
  mountPath: {{ .secret.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Its volume: only the listed keys, mode 0440 (the pod's fsGroup reads them, nobody writes). */}}
{{- define "lp.secretFilesVolume" -}}
{{- if .secret.files }}
- name: secret-files
  secret:
    secretName: {{ include "lp.secretName" . }}
    defaultMode: 288  # 0440
    items:
      {{- range .secret.files }}
      - key: {{ .key }}
        path: {{ .key }}
      {{- end }}
{{- end }}
{{- end }}

{{/* topicName -> partitions of every KafkaTopic in files/topics (deploy/k8s/topics), as JSON. */}}
{{- define "lp.topicPartitions" -}}
{{- $partitions := dict }}
{{- range $path, $_ := .Files.Glob "files/topics/*.yaml" }}
{{- $topic := fromYaml ($.Files.Get $path) }}
{{- $_ := set $partitions $topic.spec.topicName (int $topic.spec.partitions) }}
{{- end }}
{{- toJson $partitions }}
{{- end }}

{{/*
Every enabled workload, as JSON: [{name, where, connectsTo, metricsPort, apiPorts, secretOwner, secret}], where
secretOwner is the workload whose Secret it reads (a job with `service` and no `secret` of its own: that service).
The NetworkPolicies and the dev Secrets are built from it.
*/}}
{{- define "lp.workloads" -}}
{{- $workloads := list }}
{{- range $name, $spec := .Values.services }}
{{- $svc := include "lp.serviceConfig" (dict "root" $ "spec" $spec "name" $name) | fromYaml }}
{{- if $svc.enabled }}
{{- $workloads = append $workloads (dict "name" $name "where" (printf "services.%s" $name) "connectsTo" $svc.connectsTo "metricsPort" $svc.port "apiPorts" ($svc.extraPorts | default list) "secretOwner" $name "secret" $svc.secret "kafkaClient" (has "kafka" $svc.connectsTo)) }}
{{- end }}
{{- end }}
{{- range $name, $spec := .Values.jobs }}
{{- $spec = $spec | default dict }}
{{- $job := mergeOverwrite (deepCopy $.Values.jobDefaults) (deepCopy $spec) }}
{{- if (hasKey $spec "enabled" | ternary $spec.enabled $job.enabled) }}
{{- $owner := $name }}
{{- $secret := $job.secret }}
{{- if and $job.service (not (hasKey $spec "secret")) (hasKey $.Values.services $job.service) }}
{{- $owner = $job.service }}
{{- $secret = (include "lp.serviceConfig" (dict "root" $ "spec" (get $.Values.services $job.service) "name" $job.service) | fromYaml).secret }}
{{- end }}
{{- $workloads = append $workloads (dict "name" $name "where" (printf "jobs.%s" $name) "connectsTo" $job.connectsTo "metricsPort" 0 "apiPorts" list "secretOwner" $owner "secret" $secret "kafkaClient" (has "kafka" $job.connectsTo)) }}
{{- end }}
{{- end }}
{{- if .Values.debezium.enabled }}
{{- $workloads = append $workloads (dict "name" "debezium" "where" "debezium" "connectsTo" .Values.debezium.connectsTo "metricsPort" 0 "apiPorts" list "secretOwner" "debezium" "secret" .Values.debezium.secret "kafkaClient" false) }}
{{- end }}
{{- if .Values.operator.enabled }}
{{- $workloads = append $workloads (dict "name" "operator" "where" "operator" "connectsTo" .Values.operator.connectsTo "metricsPort" 8081 "apiPorts" list "secretOwner" "operator" "secret" .Values.operator.secret "kafkaClient" (has "kafka" .Values.operator.connectsTo)) }}
{{- end }}
{{- toJson $workloads }}
{{- end }}

{{/* The Secret keys one workload reads (same dict as lp.secretEnv), as JSON: {key: required}. */}}
{{- define "lp.secretKeys" -}}
{{- $keys := dict }}
{{- range .secret.env }}
{{- if kindIs "string" . }}
{{- $_ := set $keys . true }}
{{- else }}
{{- $_ := set $keys (.key | default .name) (not .optional) }}
{{- end }}
{{- end }}
{{- range .secret.files }}
{{- $_ := set $keys .key true }}
{{- end }}
{{- if and .kafkaClient (hasPrefix "SASL" (.root.Values.config.KAFKA_SECURITY_PROTOCOL | default "PLAINTEXT")) }}
{{- $_ := set $keys "KAFKA_SASL_USERNAME" true }}
{{- $_ := set $keys "KAFKA_SASL_PASSWORD" true }}
{{- end }}
{{- toJson $keys }}
{{- end }}
