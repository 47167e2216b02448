// The sandbox ("pause") container of the test bed's real node: registries are unreachable,
// so registry.k8s.io/pause cannot be pulled; testbed/node/build.sh builds this instead and
// wraps it in a one-file image. Never published.
module example.invalid/pgrs-testbed/node/pause

go 1.26.0
