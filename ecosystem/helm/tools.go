//go:build tools

// Pins the helm command so `go build helm.sh/helm/v4/cmd/helm` builds it with the dependency
// versions helm's own go.mod chose (this module adds none of its own).
package tools

import _ "helm.sh/helm/v4/cmd/helm"
