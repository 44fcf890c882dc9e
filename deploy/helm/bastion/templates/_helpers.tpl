{{/* Names: <release>-bastion unless the release is already called bastion… */}}
{{- define "bastion.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 24 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 24 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "bastion.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component (gateway, engine, postgresql, redis). */}}
{{- define "bastion.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "bastion.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "bastion.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "bastion.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the keys; refuses to render without a source for them. */}}
{{- define "bastion.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else if or .Values.secrets.externalSecret.enabled .Values.secrets.generate -}}
{{- printf "%s-keys" (include "bastion.fullname" .) -}}
{{- else -}}
{{- fail "secrets: set secrets.existingSecret (a Secret with admin-key, session-key, audit-master-key, audit-signing-key), or secrets.externalSecret.enabled, or secrets.generate=true for a trial" -}}
{{- end -}}
{{- end -}}

{{/* One engine entry with the defaults applied, as YAML (fromYaml it). Validates it. */}}
{{- define "bastion.engine" -}}
{{- $e := mergeOverwrite (deepCopy .root.Values.engineDefaults) (deepCopy .engine) -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,22}[a-z0-9])?$" (toString $e.name)) -}}
{{- fail (printf "engines: name %q must be a DNS label of at most 24 characters" (toString $e.name)) -}}
{{- end -}}
{{- if not $e.model -}}
{{- fail (printf "engines[%s]: model is required (a path on the model volume)" $e.name) -}}
{{- end -}}
{{- $_ := set $e "servedName" ($e.servedName | default $e.name) -}}
{{- $_ := set $e "alias" ($e.alias | default $e.name) -}}
{{- $_ := set $e "kind" ($e.kind | default "chat") -}}
{{- $_ := set $e "replicas" (int ($e.replicas | default 1)) -}}
{{- $_ := set $e "tensorParallel" (int ($e.tensorParallel | default $e.gpus)) -}}
{{- $_ := set $e "pipelineParallel" (int ($e.pipelineParallel | default 1)) -}}
{{- $mn := $e.multiNode | default dict -}}
{{- if $mn.enabled -}}
{{- $nodes := int ($mn.nodes | default 0) -}}
{{- if lt $nodes 2 -}}
{{- fail (printf "engines[%s]: multiNode.nodes must be at least 2" $e.name) -}}
{{- end -}}
{{- if ne (mul $e.tensorParallel $e.pipelineParallel) (mul $nodes (int $e.gpus)) -}}
{{- fail (printf "engines[%s]: tensorParallel x pipelineParallel (%d x %d) must equal multiNode.nodes x gpus (%d x %d)" $e.name $e.tensorParallel $e.pipelineParallel $nodes (int $e.gpus)) -}}
{{- end -}}
{{- else if ne (mul $e.tensorParallel $e.pipelineParallel) (int $e.gpus) -}}
{{- fail (printf "engines[%s]: tensorParallel x pipelineParallel (%d x %d) must equal gpus (%d); more GPUs than one node has: multiNode" $e.name $e.tensorParallel $e.pipelineParallel (int $e.gpus)) -}}
{{- end -}}
{{- toYaml $e -}}
{{- end -}}

{{/* The Service name an engine is reached at (the leader's, for a multi-node engine). */}}
{{- define "bastion.engineService" -}}
{{- printf "%s-engine-%s" (include "bastion.fullname" .root) .name -}}
{{- end -}}

{{/* A multi-node engine's LeaderWorkerSet (LWS makes a headless Service of this name). */}}
{{- define "bastion.engineLws" -}}
{{- printf "%s-lws" (include "bastion.engineService" .) -}}
{{- end -}}

{{/* The gateway's environment: its config, keys and database URLs (the gateway and the
migration step alike). */}}
{{- define "bastion.gatewayEnv" -}}
{{- $full := include "bastion.fullname" . -}}
{{- $secret := include "bastion.secretName" . -}}
- name: BASTION_CONFIG
  value: /etc/bastion/bastion.yaml
{{- if eq .Values.gateway.workload "StatefulSet" }}
# The pod's stable name is its audit chain id, which the log on its claim belongs to.
- name: BASTION_REPLICA_ID
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
{{- end }}
- name: BASTION_ADMIN_KEY
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: admin-key}}
- name: BASTION_SESSION_KEY
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: session-key}}
- name: BASTION_AUDIT_MASTER_KEY
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: audit-master-key}}
- name: BASTION_AUDIT_SIGNING_KEY
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: audit-signing-key}}
{{- if .Values.secrets.engineApiKey }}
- name: BASTION_ENGINE_API_KEY
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: engine-api-key}}
{{- end }}
{{- if .Values.postgresql.bundled }}
- name: BASTION_PG_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ $full }}-trial-db, key: postgres-password}}
- name: BASTION_DATABASE_URL
  value: "postgresql+psycopg://bastion:$(BASTION_PG_PASSWORD)@{{ $full }}-postgresql:5432/bastion"
{{- else }}
- name: BASTION_DATABASE_URL
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: database-url}}
{{- end }}
{{- if .Values.redis.bundled }}
- name: BASTION_REDIS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ $full }}-trial-db, key: redis-password}}
- name: BASTION_REDIS_URL
  value: "redis://:$(BASTION_REDIS_PASSWORD)@{{ $full }}-redis:6379/0"
{{- else }}
- name: BASTION_REDIS_URL
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: redis-url}}
{{- end }}
{{- with .Values.gateway.extraEnv }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}
