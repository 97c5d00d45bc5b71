// Package scripts holds the scripts Hangar serves to instances, built into
// the binary so that a pool's default bootstrap needs no file on disk.
package scripts

import (
	"embed"
	"fmt"
	"strings"
)

// Bootstrap holds bootstrap/*.sh; generic.sh is the default bootstrap.
//
//go:embed bootstrap/*.sh
var Bootstrap embed.FS

// BootstrapScript returns the built-in bootstrap script name, such as
// "generic.sh", with its includes expanded.
func BootstrapScript(name string) ([]byte, error) {
	b, err := Bootstrap.ReadFile("bootstrap/" + name)
	if err != nil {
		return nil, fmt.Errorf("reading built-in bootstrap script %q: %w", name, err)
	}
	return expandBuiltin(name, b)
}

// workerCommandDirective starts a line of a built-in script that gives the
// worker command of pools that use the script and set none.
const workerCommandDirective = "# hangar:worker-command "

// DefaultWorkerCommand returns the worker command that built-in script name
// brings for pools that set none, or "".
func DefaultWorkerCommand(name string) string {
	b, err := Bootstrap.ReadFile("bootstrap/" + name)
	if err != nil {
		return ""
	}
	return WorkerCommand(b)
}

// Enrolls says whether a bootstrap script (includes expanded) enrolls the
// instances of a batched launch: generic.sh does, and so does any script
// that includes it. The mark is the enroll route it calls.
func Enrolls(b []byte) bool {
	return strings.Contains(string(b), "/bootstrap/v1/enroll")
}

// WorkerCommand returns the worker command that a bootstrap script brings
// for pools that set none (its "# hangar:worker-command" line), or "".
func WorkerCommand(b []byte) string {
	for _, line := range strings.Split(string(b), "\n") {
		if cmd, ok := strings.CutPrefix(line, workerCommandDirective); ok {
			return strings.TrimSpace(cmd)
		}
	}
	return ""
}
