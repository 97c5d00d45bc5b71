package main

import (
	"cmp"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/hangar-ci/hangar/pool/api"
	"github.com/spf13/cobra"
)

// version and commit may be set at build time:
//
//	go build -ldflags "-X main.version=v1.2.0 -X main.commit=$(git rev-parse HEAD)" ./cmd/hangar
//
// Otherwise they come from what the Go toolchain stamped into the binary:
// the module's version ("(devel)" from a checkout) and the VCS revision.
var version, commit string

// buildInfo says which build this is.
func buildInfo() api.BuildInfo {
	b := api.BuildInfo{Version: version, Commit: commit, GoVersion: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		b.Version = cmp.Or(b.Version, bi.Main.Version)
		modified := false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				b.Commit = cmp.Or(b.Commit, s.Value)
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
		if modified && commit == "" && b.Commit != "" {
			b.Commit += "-dirty"
		}
	}
	b.Version, b.Commit = cmp.Or(b.Version, "unknown"), cmp.Or(b.Commit, "unknown")
	return b
}

func versionCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print Hangar's version, commit and Go version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			b := buildInfo()
			if g.json() {
				return g.printJSON(b)
			}
			_, err := fmt.Fprintf(g.stdout, "hangar %s (commit %s, %s)\n", b.Version, b.Commit, b.GoVersion)
			return err
		},
	}
}
