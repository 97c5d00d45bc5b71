// Package scripts holds the scripts Hangar serves to instances, built into
// the binary so that a pool's default bootstrap needs no file on disk.
package scripts

import (
	"embed"
	"fmt"
)

// Bootstrap holds bootstrap/*.sh; generic.sh is the default bootstrap.
//
//go:embed bootstrap/*.sh
var Bootstrap embed.FS

// BootstrapScript returns the built-in bootstrap script name, such as
// "generic.sh".
func BootstrapScript(name string) ([]byte, error) {
	b, err := Bootstrap.ReadFile("bootstrap/" + name)
	if err != nil {
		return nil, fmt.Errorf("reading built-in bootstrap script %q: %w", name, err)
	}
	return b, nil
}
