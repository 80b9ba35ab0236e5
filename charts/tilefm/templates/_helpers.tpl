{{/* vim: set filetype=mustache: */}}

{{/* The chart name. */}}
{{- define "tilefm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resource name prefix: <release>-<chart>, or <release> when it already holds the chart name.
Kept to 40 characters so that every suffix the chart and KubeRay add stays under 63. */}}
{{- define "tilefm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tilefm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels: include "tilefm.labels" (dict "ctx" $ "component" "api") */}}
{{- define "tilefm.labels" -}}
helm.sh/chart: {{ include "tilefm.chart" .ctx }}
{{ include "tilefm.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: tilefm
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "tilefm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tilefm.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "tilefm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tilefm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: include "tilefm.image" (dict "ctx" $ "image" .Values.image) */}}
{{- define "tilefm.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "tilefm.configName" -}}{{ include "tilefm.fullname" . }}-env{{- end }}
{{- define "tilefm.secretName" -}}{{ include "tilefm.fullname" . }}-secrets{{- end }}
{{- define "tilefm.rayClusterName" -}}{{ include "tilefm.fullname" . }}-ray{{- end }}
{{/* KubeRay names the head Service <cluster>-head-svc. */}}
{{- define "tilefm.rayHeadService" -}}{{ include "tilefm.rayClusterName" . }}-head-svc{{- end }}

{{/* TILEFM_RAY_ADDRESS: the Ray Client port of the chart's head, or ray.address. */}}
{{- define "tilefm.rayAddress" -}}
{{- if .Values.ray.enabled }}
{{- printf "ray://%s:%d" (include "tilefm.rayHeadService" .) (int .Values.ray.clientPort) }}
{{- else }}
{{- .Values.ray.address }}
{{- end }}
{{- end }}

{{/* Does the chart make its own Secret? (literal S3 keys, or API key hashes) */}}
{{- define "tilefm.hasSecret" -}}
{{- if or (and (not .Values.s3.credentials.existingSecret) .Values.s3.credentials.accessKeyId) (and (not .Values.auth.existingSecret) .Values.auth.apiKeys) }}true{{- end }}
{{- end }}

{{/* TILEFM_ALLOWED_SOURCES as a JSON list: the value, or the data volume and the bucket. */}}
{{- define "tilefm.allowedSources" -}}
{{- if .Values.settings.allowedSources }}
{{- toJson .Values.settings.allowedSources }}
{{- else }}
{{- $src := list (printf "s3://%s/" .Values.s3.bucket) }}
{{- if .Values.data.enabled }}
{{- $src = prepend $src (printf "%s/" (trimSuffix "/" .Values.data.mountPath)) }}
{{- end }}
{{- toJson $src }}
{{- end }}
{{- end }}

{{/* TILEFM_ALLOWED_OUTPUTS as a JSON list: the value, or s3://<bucket>/<prefix>. */}}
{{- define "tilefm.allowedOutputs" -}}
{{- if .Values.settings.allowedOutputs }}
{{- toJson .Values.settings.allowedOutputs }}
{{- else }}
{{- toJson (list (printf "s3://%s/%s" .Values.s3.bucket .Values.s3.prefix)) }}
{{- end }}
{{- end }}

{{/* Environment from Secrets (S3 keys, API key hashes, a Redis URL with a password), plus HOME on the
writable /tmp. include "tilefm.secretEnv" (dict "ctx" $ "apiKeys" true) */}}
{{- define "tilefm.secretEnv" -}}
{{- $v := .ctx.Values -}}
- name: HOME
  value: /tmp
{{- if or $v.s3.credentials.existingSecret $v.s3.credentials.accessKeyId }}
- name: TILEFM_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ default (include "tilefm.secretName" .ctx) $v.s3.credentials.existingSecret }}
      key: {{ ternary $v.s3.credentials.accessKeyIdKey "s3-access-key-id" (ne $v.s3.credentials.existingSecret "") }}
- name: TILEFM_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (include "tilefm.secretName" .ctx) $v.s3.credentials.existingSecret }}
      key: {{ ternary $v.s3.credentials.secretAccessKeyKey "s3-secret-access-key" (ne $v.s3.credentials.existingSecret "") }}
{{- end }}
{{- if and (not $v.redis.enabled) $v.redis.existingSecret }}
- name: TILEFM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.existingSecret }}
      key: {{ $v.redis.existingSecretKey }}
{{- end }}
{{- if and .apiKeys (or $v.auth.existingSecret $v.auth.apiKeys) }}
- name: TILEFM_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ default (include "tilefm.secretName" .ctx) $v.auth.existingSecret }}
      key: {{ ternary $v.auth.existingSecretKey "api-keys" (ne $v.auth.existingSecret "") }}
{{- end }}
{{- end }}

{{/* Pod annotations that roll pods when the settings change. */}}
{{- define "tilefm.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes every tilefm pod has: /tmp, the model store, the data volume.
include "tilefm.volumes" (dict "ctx" $ "tmpSize" "1Gi") */}}
{{- define "tilefm.volumes" -}}
{{- $v := .ctx.Values -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSize }}
- name: models
{{- if $v.modelStore.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $v.modelStore.existingClaim }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ $v.modelStore.sizeLimit }}
{{- end }}
{{- if $v.data.enabled }}
- name: data
  persistentVolumeClaim:
    claimName: {{ $v.data.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "tilefm.volumeMounts" -}}
{{- $v := .Values -}}
- name: tmp
  mountPath: /tmp
- name: models
  mountPath: {{ $v.modelStore.mountPath }}
  readOnly: true
{{- if $v.data.enabled }}
- name: data
  mountPath: {{ $v.data.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Init containers that fetch model weights into the emptyDir model store (modelStore.pull). */}}
{{- define "tilefm.initContainers" -}}
{{- $ := . }}
{{- if and (not .Values.modelStore.existingClaim) .Values.modelStore.pull }}
{{- range .Values.modelStore.pull }}
- name: pull-{{ . | lower | replace "_" "-" | replace "." "-" | trunc 50 | trimSuffix "-" }}
  image: {{ include "tilefm.image" (dict "ctx" $ "image" $.Values.image) }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  command: [tilefm, models, pull, {{ . | quote }}]
  envFrom:
    - configMapRef:
        name: {{ include "tilefm.configName" $ }}
  env:
    - name: HOME
      value: /tmp
  securityContext:
    {{- toYaml $.Values.securityContext | nindent 4 }}
  resources:
    requests: {cpu: 100m, memory: 256Mi}
    limits: {cpu: "1", memory: 1Gi}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: models
      mountPath: {{ $.Values.modelStore.mountPath }}
{{- end }}
{{- end }}
{{- end }}

{{/* Checks that values.schema.json cannot express (relations between values). */}}
{{- define "tilefm.validate" -}}
{{- $w := .Values.ray.gpuWorkers }}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) }}
{{- fail (printf "ray.gpuWorkers.minReplicas (%d) must not exceed ray.gpuWorkers.maxReplicas (%d)" (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "ray.gpuWorkers.replicas (%d) must lie between minReplicas (%d) and maxReplicas (%d)" (int $w.replicas) (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- end }}
{{- $a := .Values.tiler.autoscaling }}
{{- if and .Values.tiler.enabled $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- fail (printf "tiler.autoscaling.minReplicas (%d) must not exceed tiler.autoscaling.maxReplicas (%d)" (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- end }}
{{- if and .Values.tiler.enabled $a.enabled (not (dig "requests" "cpu" "" .Values.tiler.resources)) }}
{{- fail "tiler.autoscaling.enabled is true: set tiler.resources.requests.cpu (the HPA scales on CPU utilization of the request)" }}
{{- end }}
{{- $c := .Values.s3.credentials }}
{{- if and (not $c.existingSecret) (ne (empty $c.accessKeyId) (empty $c.secretAccessKey)) }}
{{- fail "s3.credentials: set both accessKeyId and secretAccessKey, or neither (IAM role), or existingSecret" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.url) (not .Values.redis.existingSecret) }}
{{- fail "redis.enabled is false: set redis.url or redis.existingSecret to the external Redis" }}
{{- end }}
{{- if and .Values.data.enabled (not .Values.data.existingClaim) }}
{{- fail "data.enabled is true: set data.existingClaim to the PVC holding the scenes" }}
{{- end }}
{{- end }}

{{/* The port of an http(s)/redis(s) URL: its own, or the scheme's default (empty if unknown). */}}
{{- define "tilefm.urlPort" -}}
{{- $u := urlParse .url }}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" $u.host) }}
{{- if $port }}{{ $port }}
{{- else }}{{ get (dict "https" "443" "http" "80" "redis" "6379" "rediss" "6379") $u.scheme }}
{{- end }}
{{- end }}

{{/* Ports (a JSON list of numbers) the tile server reaches the object store on. */}}
{{- define "tilefm.s3Ports" -}}
{{- $ports := .Values.networkPolicy.tilerEgress.s3Ports }}
{{- if not $ports }}
{{- $ports = list (int (default "443" (include "tilefm.urlPort" (dict "url" (default "https://s3.amazonaws.com" .Values.s3.endpoint))))) }}
{{- end }}
{{- toJson $ports }}
{{- end }}

{{/* Ports (a JSON list of numbers) of an external Redis. */}}
{{- define "tilefm.redisPorts" -}}
{{- $ports := .Values.networkPolicy.tilerEgress.redisPorts }}
{{- if not $ports }}
{{- if and .Values.redis.url (not .Values.redis.existingSecret) }}
{{- $ports = list (int (default "6379" (include "tilefm.urlPort" (dict "url" .Values.redis.url)))) }}
{{- else }}
{{- $ports = list 6379 6380 }}
{{- end }}
{{- end }}
{{- toJson $ports }}
{{- end }}
