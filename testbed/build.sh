#!/usr/bin/env bash
# Builds the test bed's real Kubernetes binaries from Go modules:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (testbed/k8s, one `go build`),
#   etcd (testbed/etcd) and helm (testbed/helm)
# into a version-keyed cache directory, and prints that directory on the last line.
# Does nothing when the directory is complete (stamp file written last).
#
#   PGRS_TESTBED_CACHE   cache root (default $HOME/.cache/pgrs-testbed)
#
# The versions are the ones pinned in the go.mod files next to this script.
# To move to another Kubernetes patch/minor:
#   testbed/build.sh --regen-k8s-mod 1.36.4
# rewrites testbed/k8s/go.mod (require + one replace per staging module, taken from
# that tag's own go.mod) and runs `go mod tidy`; commit go.mod and go.sum.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ "${1:-}" = "--regen-k8s-mod" ]; then
  version=${2:?usage: build.sh --regen-k8s-mod 1.Y.Z}
  export GOTOOLCHAIN=local
  cd "$here/k8s"
  upstream=$(go mod download -json "k8s.io/kubernetes@v$version" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  [ -f "$upstream" ] || { echo "build.sh: cannot download k8s.io/kubernetes@v$version" >&2; exit 1; }
  for m in $(go mod edit -json | sed -n 's/.*"Path": "\(k8s.io\/[a-z-]*\)".*/\1/p' | sort -u); do
    go mod edit -dropreplace="$m"
  done
  go mod edit -require="k8s.io/kubernetes@v$version"
  grep -o 'k8s.io/[a-z-]* => ./staging' "$upstream" | cut -d' ' -f1 | while read -r m; do
    go mod edit -replace="$m=$m@v0.${version#1.}"
  done
  go mod tidy
  echo "build.sh: testbed/k8s/go.mod now pins k8s.io/kubernetes v$version; also check the go/godebug lines against $upstream" >&2
  exit 0
fi

# Version of module $2 as pinned in $1/go.mod.
pinned() {
  local v
  v=$(sed -n "s|^[[:space:]]*$2 \(v[^ ]*\).*|\1|p" "$here/$1/go.mod" | head -n1)
  if [ -z "$v" ]; then
    echo "build.sh: $2 is not pinned in testbed/$1/go.mod" >&2
    exit 1
  fi
  echo "$v"
}

k8s_version=$(pinned k8s k8s.io/kubernetes)
etcd_version=$(pinned etcd go.etcd.io/etcd/server/v3)
helm_version=$(pinned helm helm.sh/helm/v3)

cache_root=${PGRS_TESTBED_CACHE:-$HOME/.cache/pgrs-testbed}
dir="$cache_root/$k8s_version-$etcd_version-$helm_version"
bin="$dir/bin"
stamp="$dir/complete"

if [ -f "$stamp" ] && [ -x "$bin/kube-scheduler" ]; then
  echo "build.sh: binaries already built ($(cat "$stamp"))" >&2
  echo "$bin"
  exit 0
fi

if ! command -v go >/dev/null; then
  echo "build.sh: the go toolchain is not installed (need go >= 1.26)" >&2
  exit 1
fi

# A too-new `go` line must fail loudly, never fetch a toolchain; everything static.
export GOTOOLCHAIN=local CGO_ENABLED=0
# Go's own parallelism defaults to the CPU count; say it for 2-core CI.
jobs=${PGRS_TESTBED_GO_JOBS:-$(nproc)}

# kube-apiserver/-controller-manager/kubectl flags, shared by the full build and the add-on below.
minor=${k8s_version#v1.}
minor=${minor%%.*}
k8s_ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags="$k8s_ldflags -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  k8s_ldflags="$k8s_ldflags -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

# A cache completed before kube-scheduler was added to this script (the real node needs a
# scheduler; the fake kubelet binds pods itself): build that one binary into it.
if [ -f "$stamp" ]; then
  echo "build.sh: adding kube-scheduler $k8s_version to $bin" >&2
  start=$(date +%s)
  if [ -z "${PGRS_TESTBED_GOCACHE:-}" ]; then
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/pgrs-testbed-gocache.XXXXXX")
    trap 'rm -rf "$scratch"' EXIT
    export GOCACHE="$scratch"
  else
    export GOCACHE="$PGRS_TESTBED_GOCACHE"
  fi
  (cd "$here/k8s" && go build -p "$jobs" -trimpath -tags=notest -ldflags="$k8s_ldflags" \
    -o "$bin/kube-scheduler.tmp" k8s.io/kubernetes/cmd/kube-scheduler)
  mv "$bin/kube-scheduler.tmp" "$bin/kube-scheduler"
  echo "build.sh: kube-scheduler added in $(($(date +%s) - start))s" >&2
  echo "$bin"
  exit 0
fi

rm -rf "$dir"
mkdir -p "$bin"
start=$(date +%s)

# Go's build cache for these three programs is several GB that nothing reads again once the
# binaries are cached: keep it in a scratch directory removed on exit (PGRS_TESTBED_GOCACHE
# keeps a persistent one, e.g. while working on this script).
if [ -z "${PGRS_TESTBED_GOCACHE:-}" ]; then
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/pgrs-testbed-gocache.XXXXXX")
  trap 'rm -rf "$scratch"' EXIT
  export GOCACHE="$scratch"
else
  export GOCACHE="$PGRS_TESTBED_GOCACHE"
fi

# kube-apiserver / kube-controller-manager / kubectl. Version ldflags set to the exact
# tag: /version, helm's kubeVersion checks and version-gated features depend on it.
echo "build.sh: building kubernetes $k8s_version (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl)" >&2
(cd "$here/k8s" && go build -p "$jobs" -trimpath -tags=notest -ldflags="$k8s_ldflags" -o "$bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl)
k8s_done=$(date +%s)

# etcd's version string is a constant in the module; no ldflags needed.
echo "build.sh: building etcd $etcd_version" >&2
(cd "$here/etcd" && go build -p "$jobs" -trimpath -ldflags="-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
etcd_done=$(date +%s)

# helm: its own version, and the k8s minor it assumes when it has no cluster to ask.
echo "build.sh: building helm $helm_version" >&2
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
helm_ldflags="$helm_ldflags -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_ldflags="$helm_ldflags -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
done
(cd "$here/helm" && go build -p "$jobs" -trimpath -ldflags="$helm_ldflags" -o "$bin/helm" helm.sh/helm/v3/cmd/helm)
end=$(date +%s)

for b in kube-apiserver kube-controller-manager kube-scheduler kubectl etcd helm; do
  [ -x "$bin/$b" ] || { echo "build.sh: $bin/$b was not produced" >&2; exit 1; }
done

summary="k8s=$k8s_version etcd=$etcd_version helm=$helm_version cold build $((end - start))s"
summary="$summary (k8s $((k8s_done - start))s, etcd $((etcd_done - k8s_done))s, helm $((end - etcd_done))s)"
echo "build.sh: $summary" >&2
echo "$summary, built $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$stamp"
echo "$bin"
