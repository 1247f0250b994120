{{/*
Cluster-scoped objects and the service accounts have fixed names (toe-operator, toe-agent,
toe-validate-powertool): the CRDs are cluster-wide, so one TOE per cluster is the only sensible
install, and fixed names let the operator's ClusterRole name exactly the webhook configuration it
may update (resourceNames), as toe_operator::rbac does.
*/}}

{{- define "toe.labels" -}}
app.kubernetes.io/name: toe
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "toe.selector" -}}
app.kubernetes.io/name: toe
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "toe.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end }}

{{- define "toe.webhookService" -}}toe-webhook{{- end }}
{{- define "toe.webhookSecret" -}}toe-webhook-tls{{- end }}

{{/* Where the agents write and the operator reads: the same URL for both. */}}
{{- define "toe.artifactsEnv" -}}
- name: TOE_OUTPUT
  value: {{ .Values.artifacts.url | quote }}
- name: TOE_ALLOWED_OUTPUTS
  value: {{ join "," (.Values.artifacts.allowedUrls | default list) | quote }}
{{- end }}
{{- define "toe.artifactsEnvFrom" -}}
{{- with .Values.artifacts.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end }}
