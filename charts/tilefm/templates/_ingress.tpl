{{/* An Ingress for a component's Service: include "tilefm.ingress" (dict "ctx" $ "component" "api" "ingress" .Values.api.ingress "port" "http") */}}
{{- define "tilefm.ingress" -}}
{{- $svc := printf "%s-%s" (include "tilefm.fullname" .ctx) .component -}}
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {{ $svc }}
  labels:
    {{- include "tilefm.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
  {{- with .ingress.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with .ingress.className }}
  ingressClassName: {{ . }}
  {{- end }}
  {{- with .ingress.tls }}
  tls:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  rules:
    {{- range .ingress.hosts }}
    - host: {{ .host | quote }}
      http:
        paths:
          {{- range (default (list (dict "path" "/" "pathType" "Prefix")) .paths) }}
          - path: {{ .path }}
            pathType: {{ default "Prefix" .pathType }}
            backend:
              service:
                name: {{ $svc }}
                port:
                  name: {{ $.port }}
          {{- end }}
    {{- end }}
{{- end }}
