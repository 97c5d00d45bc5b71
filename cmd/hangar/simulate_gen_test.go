package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool/sim"
	"github.com/spf13/cobra"
)

// runGen runs `hangar simulate gen ARGS` through the real root command, so
// that its -o is seen to shadow the global one. Until `hangar simulate`
// adds gen, a bare simulate stands in for it.
func runGen(t *testing.T, args ...string) (stdout string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	root := newRoot(&out, &errOut)
	if c, _, err := root.Find([]string{"simulate", "gen"}); err != nil || c.Name() != "gen" {
		parent := &cobra.Command{Use: "simulate"}
		parent.AddCommand(simulateGenCmd(&globals{stdout: &out, stderr: &errOut}))
		root.AddCommand(parent)
	}
	root.SetArgs(append([]string{"simulate", "gen"}, args...))
	err = root.Execute()
	return out.String(), err
}

// TestSimulateGenShippedTrace runs the command pool/sim/traces/README.md
// gives for synthetic.csv and compares its output with the shipped file.
func TestSimulateGenShippedTrace(t *testing.T) {
	readme, err := os.ReadFile("../../pool/sim/traces/README.md")
	if err != nil {
		t.Fatal(err)
	}
	var command string
	for line := range strings.SplitSeq(string(readme), "\n") {
		if strings.HasPrefix(line, "hangar simulate gen ") && strings.HasSuffix(line, " -o pool/sim/traces/synthetic.csv") {
			command = line
		}
	}
	if command == "" {
		t.Fatal("pool/sim/traces/README.md has no line `hangar simulate gen … -o pool/sim/traces/synthetic.csv`")
	}
	shipped, err := os.ReadFile("../../pool/sim/traces/synthetic.csv")
	if err != nil {
		t.Fatal(err)
	}

	out := filepath.Join(t.TempDir(), "synthetic.csv")
	args := strings.Fields(strings.TrimSuffix(strings.TrimPrefix(command, "hangar simulate gen "), "pool/sim/traces/synthetic.csv"))
	if _, err := runGen(t, append(args, out)...); err != nil {
		t.Fatalf("%s: %v", command, err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, shipped) {
		t.Fatalf("`%s` wrote %d bytes that differ from the shipped synthetic.csv (%d bytes)", command, len(got), len(shipped))
	}
	if info, err := os.Stat(out); err != nil || info.Mode().Perm() != 0o644 {
		t.Errorf("the trace's mode is %v (%v), want 0644", info.Mode().Perm(), err)
	}

	// Without -o, the same trace on standard output.
	stdout, err := runGen(t, args[:len(args)-1]...)
	if err != nil || stdout != string(shipped) {
		t.Fatalf("to standard output: %d bytes, error %v; want the shipped trace", len(stdout), err)
	}
}

// TestSimulateGenFlags: each flag reaches the generator's options.
func TestSimulateGenFlags(t *testing.T) {
	stdout, err := runGen(t, "--days", "1.5", "--seed", "7", "--peak-pushes-per-hour", "90",
		"--night-factor", "0.1", "--weekend-factor", "0.5", "--work-start", "7", "--work-end", "21",
		"--utc-offset", "-5h", "--single-job", "0.5", "--matrix-min", "3", "--matrix-max", "6",
		"--spread", "10s", "--median", "90s", "--sigma", "0.4", "--pools", "linux=3, macos")
	if err != nil {
		t.Fatal(err)
	}
	o := sim.GenOptions{
		Seed: 7, Days: 1.5, PeakPushesPerHour: 90, NightFactor: 0.1, WeekendFactor: 0.5,
		WorkStartHour: 7, WorkEndHour: 21, UTCOffset: -5 * time.Hour,
		SingleJobProb: 0.5, MatrixMin: 3, MatrixMax: 6, Spread: 10 * time.Second,
		MedianDuration: 90 * time.Second, Sigma: 0.4,
		Pools: []sim.PoolShare{{Name: "linux", Weight: 3}, {Name: "macos", Weight: 1}},
	}
	var want bytes.Buffer
	if err := sim.Generate(o, &want); err != nil {
		t.Fatal(err)
	}
	if stdout != want.String() {
		t.Fatalf("the flags wrote a trace (%d bytes) other than their options' (%d bytes); first lines:\n%.200s", len(stdout), want.Len(), stdout)
	}
	if !strings.HasPrefix(stdout, "submit_s,duration_s,pool\n") {
		t.Fatalf("with --pools, header %.30q", stdout)
	}
}

func TestSimulateGenErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"bad options", []string{"--days", "0", "--sigma", "-1"},
			"days must be more than 0 and at most 3660, not 0\nsigma must be between 0 and 5, not -1"},
		{"bad pool weight", []string{"--pools", "linux=lots"}, `--pools: weight of "linux" is not a number: "lots"`},
		{"bad pool name", []string{"--pools", "linux=1,,macos"}, "pool 2 has no name"},
		{"no such directory", []string{"-o", filepath.Join(dir, "missing", "t.csv")}, "writing trace to " + filepath.Join(dir, "missing", "t.csv") + ": "},
		{"arguments", []string{"extra"}, `unknown command "extra"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stdout, err := runGen(t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
			if stdout != "" {
				t.Errorf("wrote %.80q despite the error", stdout)
			}
		})
	}

	// A trace refused leaves nothing behind, not even a temporary file.
	out := filepath.Join(dir, "t.csv")
	if _, err := runGen(t, "--median", "-1s", "-o", out); err == nil {
		t.Fatal("a negative median was accepted")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("a refused trace left %v", entries)
	}
}
