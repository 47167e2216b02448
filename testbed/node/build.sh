#!/usr/bin/env bash
# Builds what a real test-bed node runs, from Go modules, into a version-keyed cache directory,
# and prints that directory on the last line:
#   kubelet                                   testbed/node/kubelet (same k8s.io/kubernetes
#                                             version and staging replaces as testbed/k8s)
#   containerd, containerd-shim-runc-v2, ctr  testbed/node/containerd
#   CNI bridge, host-local, loopback, portmap testbed/node/cni
#   the sandbox ("pause") image               testbed/node/pause, wrapped by podman in a
#                                             one-file image saved as images/pause.tar
# runc is Debian's (/usr/sbin/runc, apt-get install runc). Does nothing when the directory is
# complete (stamp file written last). Layout of the directory:
#   bin/{kubelet,containerd,containerd-shim-runc-v2,ctr,pause}  cni/{bridge,host-local,...}
#   images/pause.tar  complete
#
#   PGRS_TESTBED_CACHE    cache root (default $HOME/.cache/pgrs-testbed)
#   PGRS_TESTBED_GOCACHE  keep Go's build cache there (default: a scratch dir removed on exit)
#   PGRS_TESTBED_GO_JOBS  go build -p (default: the CPU count)
#
# After testbed/build.sh --regen-k8s-mod, copy testbed/k8s/go.mod's require/replace blocks to
# testbed/node/kubelet/go.mod (keep its module and tool lines) and run `go mod tidy` there.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Version of module $2 as pinned in $1/go.mod.
pinned() {
  local v
  v=$(sed -n "s|^[[:space:]]*$2 \(v[^ ]*\).*|\1|p" "$here/$1/go.mod" | head -n1)
  if [ -z "$v" ]; then
    echo "node/build.sh: $2 is not pinned in testbed/node/$1/go.mod" >&2
    exit 1
  fi
  echo "$v"
}

# Bump when the way the directory is made changes (e.g. the pause image).
REV=1
k8s_version=$(pinned kubelet k8s.io/kubernetes)
containerd_version=$(pinned containerd github.com/containerd/containerd/v2)
cni_version=$(pinned cni github.com/containernetworking/plugins)

cache_root=${PGRS_TESTBED_CACHE:-$HOME/.cache/pgrs-testbed}
dir="$cache_root/node-$k8s_version-containerd-$containerd_version-cni-$cni_version-r$REV"
stamp="$dir/complete"

if [ -f "$stamp" ]; then
  echo "node/build.sh: node binaries already built ($(cat "$stamp"))" >&2
  echo "$dir"
  exit 0
fi

for tool in go podman; do
  command -v "$tool" >/dev/null || {
    echo "node/build.sh: $tool is not installed (go >= 1.26.8; podman from scripts/setup-debian)" >&2
    exit 1
  }
done
[ -x /usr/sbin/runc ] || echo "node/build.sh: warning: /usr/sbin/runc is missing (apt-get install runc)" >&2

export GOTOOLCHAIN=local CGO_ENABLED=0
jobs=${PGRS_TESTBED_GO_JOBS:-$(nproc)}

rm -rf "$dir"
mkdir -p "$dir/bin" "$dir/cni" "$dir/images"
start=$(date +%s)

if [ -z "${PGRS_TESTBED_GOCACHE:-}" ]; then
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/pgrs-node-gocache.XXXXXX")
  trap 'rm -rf "$scratch"' EXIT
  export GOCACHE="$scratch"
else
  export GOCACHE="$PGRS_TESTBED_GOCACHE"
fi

# kubelet, with the same version ldflags as testbed/build.sh gives the control plane.
minor=${k8s_version#v1.}
minor=${minor%%.*}
k8s_ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags="$k8s_ldflags -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  k8s_ldflags="$k8s_ldflags -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
echo "node/build.sh: building kubelet $k8s_version" >&2
(cd "$here/kubelet" && go build -p "$jobs" -trimpath -tags=notest -ldflags="$k8s_ldflags" \
  -o "$dir/bin/" k8s.io/kubernetes/cmd/kubelet)
kubelet_done=$(date +%s)

# containerd: the Makefile's static build tags; btrfs needs cgo, so it is left out.
echo "node/build.sh: building containerd $containerd_version" >&2
containerd_ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$containerd_version"
(cd "$here/containerd" && go build -p "$jobs" -trimpath \
  -tags 'urfave_cli_no_docs osusergo netgo static_build no_btrfs' -ldflags="$containerd_ldflags" \
  -o "$dir/bin/" \
  github.com/containerd/containerd/v2/cmd/containerd \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
  github.com/containerd/containerd/v2/cmd/ctr)
containerd_done=$(date +%s)

echo "node/build.sh: building CNI plugins $cni_version" >&2
p=github.com/containernetworking/plugins/plugins
(cd "$here/cni" && go build -p "$jobs" -trimpath -ldflags="-s -w" -o "$dir/cni/" \
  $p/main/bridge $p/main/loopback $p/ipam/host-local $p/meta/portmap)
cni_done=$(date +%s)

# The sandbox image: registry.k8s.io/pause cannot be pulled here.
echo "node/build.sh: building the pause image" >&2
(cd "$here/pause" && go build -trimpath -ldflags="-s -w" -o "$dir/bin/pause" .)
context=$(mktemp -d "${TMPDIR:-/tmp}/pgrs-node-pause.XXXXXX")
cp "$dir/bin/pause" "$context/pause"
printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$context/Containerfile"
pause_image=localhost/pgrs-testbed/pause:$REV
podman build --quiet --tag "$pause_image" "$context" >/dev/null
rm -rf "$context"
podman save --quiet --format docker-archive --output "$dir/images/pause.tar" "$pause_image"
end=$(date +%s)

for b in bin/kubelet bin/containerd bin/containerd-shim-runc-v2 bin/ctr bin/pause \
  cni/bridge cni/loopback cni/host-local cni/portmap images/pause.tar; do
  [ -e "$dir/$b" ] || { echo "node/build.sh: $dir/$b was not produced" >&2; exit 1; }
done

summary="kubelet=$k8s_version containerd=$containerd_version cni=$cni_version r$REV"
kind="cold build"
[ -z "${PGRS_TESTBED_GOCACHE:-}" ] || kind="build with GOCACHE=$PGRS_TESTBED_GOCACHE"
summary="$summary $kind $((end - start))s (kubelet $((kubelet_done - start))s,"
summary="$summary containerd $((containerd_done - kubelet_done))s, cni $((cni_done - containerd_done))s,"
summary="$summary pause $((end - cni_done))s)"
echo "node/build.sh: $summary" >&2
echo "$summary, built $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$stamp"
echo "$dir"
