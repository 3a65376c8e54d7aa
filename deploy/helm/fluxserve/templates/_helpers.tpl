{{/* Names, labels, the store's secret and each worker group's values. */}}

{{- define "fluxserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fluxserve.fullname" -}}
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

{{- define "fluxserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fluxserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fluxserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fluxserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fluxserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* A worker group's Deployment and ScaledObject: (dict "root" $ "name" NAME). */}}
{{- define "fluxserve.workerName" -}}
{{- printf "%s-worker-%s" (include "fluxserve.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret holding the store URL (and what KEDA reads the queue with). */}}
{{- define "fluxserve.secretName" -}}
{{- default (printf "%s-store" (include "fluxserve.fullname" .)) .Values.store.existingSecret }}
{{- end }}

{{/* One of the Secret's keys (url, kedaRedisAddress, kedaRedisUsername, kedaRedisPassword,
kedaPostgresConnection): existingSecretKeys, or the chart's own names; "" when the Secret has none. */}}
{{- define "fluxserve.secretKey" -}}
{{- if .root.Values.store.existingSecret }}
{{- get .root.Values.store.existingSecretKeys .key }}
{{- else if eq .key "kedaRedisUsername" }}
{{- if include "fluxserve.redisUsername" .root }}keda-redis-username{{ end }}
{{- else if eq .key "kedaRedisPassword" }}
{{- if include "fluxserve.redisPassword" .root }}keda-redis-password{{ end }}
{{- else }}
{{- get (dict "url" "store-url" "kedaRedisAddress" "keda-redis-address" "kedaPostgresConnection" "keda-postgres-connection") .key }}
{{- end }}
{{- end }}

{{/* redis | postgresql: from the URL's scheme, or store.type with an existing Secret. */}}
{{- define "fluxserve.storeType" -}}
{{- if .Values.store.existingSecret }}
{{- required "store.type (redis | postgresql) is required with store.existingSecret" .Values.store.type }}
{{- else }}
{{- $scheme := (urlParse (required "store.url (or store.existingSecret) is required" .Values.store.url)).scheme }}
{{- if has $scheme (list "redis" "rediss") }}redis
{{- else if has $scheme (list "postgres" "postgresql") }}postgresql
{{- else }}{{ fail (printf "store.url: unsupported scheme %q (redis://, rediss://, postgresql://)" $scheme) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The store's host[:port] as KEDA's operator (in another namespace) resolves it: a name without a dot
is completed with the release's namespace. (dict "root" $ "port" DEFAULT_PORT_OR_EMPTY) */}}
{{- define "fluxserve.kedaHost" -}}
{{- $url := urlParse .root.Values.store.url }}
{{- $hostname := $url.hostname }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" }}
{{- if and (regexMatch "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$" $hostname) (ne $hostname "localhost") }}
{{- $hostname = printf "%s.%s.svc" $hostname .root.Release.Namespace }}
{{- else if contains ":" $hostname }}
{{- $hostname = printf "[%s]" $hostname }}
{{- end }}
{{- $port = default .port $port }}
{{- if $port }}{{ printf "%s:%s" $hostname $port }}{{ else }}{{ $hostname }}{{ end }}
{{- end }}

{{/* The PostgreSQL URL KEDA's operator connects with: the store URL, its host as kedaHost says. */}}
{{- define "fluxserve.kedaPostgresConnection" -}}
{{- $url := urlParse .Values.store.url }}
{{- urlJoin (dict "scheme" $url.scheme "userinfo" $url.userinfo "host" (include "fluxserve.kedaHost" (dict "root" . "port" "")) "path" $url.path "query" $url.query) }}
{{- end }}

{{/* The URL's user name and password (empty when absent); percent-encoded ones cannot be decoded here. */}}
{{- define "fluxserve.userinfo" -}}
{{- $userinfo := (urlParse .Values.store.url).userinfo }}
{{- if contains "%" $userinfo }}
{{- fail "store.url: percent-encoded credentials: put the URL in store.existingSecret (with the keda-* keys) instead" }}
{{- end }}
{{- $userinfo }}
{{- end }}

{{- define "fluxserve.redisUsername" -}}
{{- $userinfo := include "fluxserve.userinfo" . }}
{{- if contains ":" $userinfo }}{{ (splitn ":" 2 $userinfo)._0 }}{{ else }}{{ $userinfo }}{{ end }}
{{- end }}

{{- define "fluxserve.redisPassword" -}}
{{- $userinfo := include "fluxserve.userinfo" . }}
{{- if contains ":" $userinfo }}{{ (splitn ":" 2 $userinfo)._1 }}{{ end }}
{{- end }}

{{/* The Redis database index and TLS, for KEDA's redis scaler. */}}
{{- define "fluxserve.redisDatabase" -}}
{{- if .Values.store.existingSecret }}{{ .Values.store.redisDatabase }}
{{- else }}{{ default "0" (trimPrefix "/" (urlParse .Values.store.url).path) }}
{{- end }}
{{- end }}

{{- define "fluxserve.redisTLS" -}}
{{- if .Values.store.existingSecret }}{{ .Values.store.redisTLS }}
{{- else }}{{ eq (urlParse .Values.store.url).scheme "rediss" }}
{{- end }}
{{- end }}

{{/* `over` laid on `base`, maps merged at any depth; a key `over` names wins even when false or 0 (which
sprig's merge functions take for unset). As YAML: (dict "base" MAP "over" MAP). */}}
{{- define "fluxserve.overlay" -}}
{{- $out := deepCopy .base }}
{{- range $key, $value := .over }}
{{- if and (kindIs "map" $value) (kindIs "map" (get $out $key)) }}
{{- $_ := set $out $key (include "fluxserve.overlay" (dict "base" (get $out $key) "over" $value) | fromYaml) }}
{{- else }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* A worker group's values: workerDefaults with the entry laid on it, as YAML. */}}
{{- define "fluxserve.workerValues" -}}
{{- include "fluxserve.overlay" (dict "base" .root.Values.workerDefaults "over" .entry) }}
{{- end }}

{{/* The model table (JSON): `models`, or the default one when empty. */}}
{{- define "fluxserve.models" -}}
{{- .Values.models | default (dict "flux-dev" "black-forest-labs/FLUX.1-dev") | toJson }}
{{- end }}

{{/* The model table as a models file: [models.<slug>] tables of options, a bare location as `model`.
Whole numbers are written as integers (values arrive as floats). Checks every slug as the service does. */}}
{{- define "fluxserve.modelsFile" -}}
{{- $reserved := list "models" "images" "account" "loras" "webhooks" "requests" "media" }}
{{- $tables := dict }}
{{- range $slug, $entry := include "fluxserve.models" . | fromJson }}
{{- if has (lower $slug) $reserved }}
{{- fail (printf "models: %q is a path of the API, not usable as a model slug" $slug) }}
{{- end }}
{{- $options := dict }}
{{- range $name, $value := (kindIs "map" $entry | ternary $entry (dict "model" $entry)) }}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{- $value = int64 $value }}
{{- end }}
{{- $_ := set $options $name $value }}
{{- end }}
{{- if not $options.model }}
{{- fail (printf "models.%s: no `model` (its location)" $slug) }}
{{- end }}
{{- if $.Values.keda.enabled }}
{{- /* KEDA starts the workers on the queue: a submit must queue while a group is at zero. */}}
{{- $_ := set $options "on_demand" true }}
{{- end }}
{{- $_ := set $tables $slug $options }}
{{- end }}
{{- dict "models" $tables | toToml }}
{{- end }}

{{/* The models a worker group loads: its `models`, or every model of the table; each checked. A JSON list.
(dict "root" $ "group" GROUP_VALUES) */}}
{{- define "fluxserve.groupModels" -}}
{{- $table := include "fluxserve.models" .root | fromJson }}
{{- $models := .group.models | default (keys $table | sortAlpha) }}
{{- range $models }}
{{- if not (hasKey $table .) }}
{{- fail (printf "workers[%s].models: %q is not in `models`" $.group.name .) }}
{{- end }}
{{- end }}
{{- $models | uniq | toJson }}
{{- end }}

{{/* The environment every fluxserve process shares. */}}
{{- define "fluxserve.commonEnv" -}}
- name: FLUXSERVE_STORE
  valueFrom:
    secretKeyRef:
      name: {{ include "fluxserve.secretName" . }}
      key: {{ include "fluxserve.secretKey" (dict "root" . "key" "url") }}
- name: FLUXSERVE_REDIS_PREFIX
  value: {{ .Values.store.redisPrefix | quote }}
- name: FLUXSERVE_HOST
  value: "0.0.0.0"
- name: FLUXSERVE_PORT
  value: "8000"
- name: FLUXSERVE_LOG_FORMAT
  value: json
- name: FLUXSERVE_MODELS_FILE
  value: /etc/fluxserve/models.toml
{{- end }}

{{/* name: value pairs of a map, as container env entries. */}}
{{- define "fluxserve.envMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Checksums of the chart's Secret and models file, so pods roll when the store URL or the models change. */}}
{{- define "fluxserve.checksums" -}}
checksum/models: {{ include "fluxserve.modelsFile" . | sha256sum }}
{{- if not .Values.store.existingSecret }}
checksum/store: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/* The models file, mounted read-only where FLUXSERVE_MODELS_FILE points. */}}
{{- define "fluxserve.modelsVolume" -}}
- name: models-file
  configMap:
    name: {{ include "fluxserve.fullname" . }}-models
{{- end }}
