// Package scripts holds the scripts Hangar serves to instances, built into
// the binary so that a pool's default bootstrap needs no file on disk.
package scripts

import (
	"bytes"
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
	return expandIncludes(name, b)
}

// includeDirective, alone on a line of a built-in script, stands for another
// built-in script, less its #! line: a script for one CI builds on
// generic.sh's protocol instead of copying it. Included scripts are not
// expanded again, so includes cannot loop.
const includeDirective = "# hangar:include "

func expandIncludes(name string, b []byte) ([]byte, error) {
	if !bytes.Contains(b, []byte(includeDirective)) {
		return b, nil
	}
	var out bytes.Buffer
	for _, line := range bytes.SplitAfter(b, []byte("\n")) {
		included, ok := strings.CutPrefix(strings.TrimRight(string(line), "\n"), includeDirective)
		if !ok {
			out.Write(line)
			continue
		}
		body, err := Bootstrap.ReadFile("bootstrap/" + included)
		if err != nil {
			return nil, fmt.Errorf("reading built-in bootstrap script %q: including %q: %w", name, included, err)
		}
		if bytes.HasPrefix(body, []byte("#!")) {
			_, body, _ = bytes.Cut(body, []byte("\n"))
		}
		out.Write(body)
	}
	return out.Bytes(), nil
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
	for _, line := range strings.Split(string(b), "\n") {
		if cmd, ok := strings.CutPrefix(line, workerCommandDirective); ok {
			return strings.TrimSpace(cmd)
		}
	}
	return ""
}
