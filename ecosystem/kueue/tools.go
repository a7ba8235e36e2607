//go:build tools

// Pins Kueue's manager so `go build sigs.k8s.io/kueue/cmd/kueue` builds it with the dependency
// versions Kueue's own go.mod chose (this module adds none of its own).
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
