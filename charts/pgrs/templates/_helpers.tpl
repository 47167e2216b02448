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

{{/*
The operator's rules, for the ClusterRole (all namespaces) or the Role (watchNamespace). Each
verb is one the operator's code calls (src/operator, src/coordination/kube), or one the agents'
Role grants: RBAC lets the operator create that Role only if it holds the same verbs itself.
Server-side apply is a patch; creating a missing object with it needs create as well.
*/}}
{{- define "pgrs.rules" -}}
- apiGroups: ["pgrs.dev"]
  resources: ["pgreplicasets"]
  # list/watch: the controller. patch: removing the pgrs.dev/switchover-to annotation once read.
  verbs: ["list", "watch", "patch"]
- apiGroups: ["pgrs.dev"]
  resources: ["pgreplicasets/status"]
  # patch: the status written after each round.
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  # list/watch: the controller owns them (and an upgrade lists a cluster's); create/patch: apply.
  # No delete: the garbage collector removes them with their PgReplicaSet (ownerReferences).
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  # list/watch: the controller owns them; create/patch: apply.
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  # get: the control-state ConfigMap read on first sight of a cluster; create/patch: apply and
  # the control-state writes. Not watched.
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  # get: <name>-secrets and <name>-app, read by name before each apply; create/patch: apply.
  # No list/watch: no controller watches Secrets.
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  # create/patch: apply of the agents' ServiceAccount.
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  # list/watch: the controller maps pod changes to their cluster, and each round lists them;
  # patch: role labels; delete: a major-version upgrade restarts each pod once on the new image;
  # get: held because the agents' Role grants it.
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  # create/patch: apply.
  verbs: ["create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  # create/patch: apply of the agents' Role and RoleBinding.
  verbs: ["create", "patch"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  # get/create/update: the operator reads each cluster's <name>-primary Lease, creates it, and
  # hands it over during a major-version upgrade; watch: held because the agents' Role grants it
  # (with get and update).
  verbs: ["get", "watch", "create", "update"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  # create/patch: kube-runtime's event Recorder (patch: a repeated event's series).
  verbs: ["create", "patch"]
{{- end -}}

{{/* The labels the operator puts on every database pod (src/api/names.rs cluster_labels). */}}
{{- define "pgrs.databaseLabels" -}}
app.kubernetes.io/managed-by: pgrs-operator
app.kubernetes.io/component: database
{{- end -}}
