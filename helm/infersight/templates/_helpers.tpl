{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "infersight.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or fullnameOverride. */}}
{{- define "infersight.fullname" -}}
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

{{- define "infersight.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "infersight.selectorLabels" -}}
app.kubernetes.io/name: {{ include "infersight.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "infersight.labels" -}}
helm.sh/chart: {{ include "infersight.chart" . }}
{{ include "infersight.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "infersight.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "infersight.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest pins the image. */}}
{{- define "infersight.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The capability set. Without privileged mode: drop everything, then add exactly
what loading BPF programs and reading other processes needs:
  BPF            bpf() for programs and maps (kernel >= 5.8)
  PERFMON        perf_event_open for tracepoints/uprobes, bpf_probe_read (>= 5.8)
  SYS_PTRACE     reading /proc/<pid>/{maps,exe,root} of other containers' processes
  DAC_READ_SEARCH  open files under /proc/<pid>/root whatever their mode (libcuda, libssl)
  SYS_RESOURCE   raise RLIMIT_MEMLOCK for BPF maps (kernels < 5.11 charge maps to memlock)
SYS_ADMIN only when security.sysAdmin is set (kernels < 5.8 need it for bpf()).
*/}}
{{- define "infersight.capabilities" -}}
{{- $caps := list "BPF" "PERFMON" "SYS_PTRACE" "DAC_READ_SEARCH" "SYS_RESOURCE" }}
{{- if .Values.security.sysAdmin }}
{{- $caps = append $caps "SYS_ADMIN" }}
{{- end }}
drop:
  - ALL
add:
{{- range $caps }}
  - {{ . }}
{{- end }}
{{- end }}

{{/* OTEL_RESOURCE_ATTRIBUTES: the user's attributes plus k8s.node.name from the downward API. */}}
{{- define "infersight.resourceAttributes" -}}
{{- $attrs := list }}
{{- range $k, $v := .Values.otlp.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $k (toString $v)) }}
{{- end }}
{{- $attrs = append $attrs "k8s.node.name=$(NODE_NAME)" }}
{{- join "," $attrs }}
{{- end }}
