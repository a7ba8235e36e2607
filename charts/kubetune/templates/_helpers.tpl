{{- define "kubetune.name" -}}{{ .Release.Name }}-kubetune{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubetune.selector" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.image" -}}
{{ .image.registry }}/{{ .image.repository }}:{{ .image.tag | default .appVersion }}
{{- end -}}

{{/* Pod and container security that PodSecurity "restricted" admits. */}}
{{- define "kubetune.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- define "kubetune.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* What the operator does through the API, and nothing more. */}}
{{- define "kubetune.operatorRules" -}}
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs", "loraadapters"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/status", "loraadapters/status"]
  verbs: ["patch"]
- apiGroups: ["kubetune.dev"]
  resources: ["loraadapters"]
  verbs: ["create"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "delete"]
- apiGroups: [""]
  resources: ["services"]  # headless, for multi-node rendezvous
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]  # why Kueue holds a queued job, mirrored into its status
  verbs: ["list"]
{{- end -}}
