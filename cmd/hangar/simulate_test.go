package main

import (
	"bytes"
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const simConfig = `
[providers.cloud]
type = "local"
boot_delay = "30s"

[pools.linux]
provider = "cloud"
min_idle = 1
max_instances = 8
idle_ttd = "5m"

[pools.mac]
provider = "cloud"
max_instances = 2
`

// simFiles writes the config and a trace (and more files) under a temp dir
// and returns their paths by name.
func simFiles(t *testing.T, files map[string]string) map[string]string {
	t.Helper()
	dir := t.TempDir()
	paths := map[string]string{}
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		paths[name] = p
	}
	return paths
}

func runSim(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(append([]string{"simulate"}, args...), &out, &errb)
	return out.String(), errb.String(), code
}

// TestSimulateJSON: hangar simulate -o json prints one object with exactly
// the names the issue gives scripts, a line per policy and grid point, the
// boot from the provider's boot_delay; the same run prints the same bytes.
func TestSimulateJSON(t *testing.T) {
	f := simFiles(t, map[string]string{
		"hangar.toml": simConfig,
		"trace.csv":   "submit_s,duration_s,pool\n0,60,linux\n10,30,linux\n20,120,mac\n700,30,linux\n",
	})
	out, stderr, code := runSim(t, "--config", f["hangar.toml"], "--trace", f["trace.csv"], "--grid", "-o", "json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var rep map[string]any
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("not one JSON object: %v\n%s", err, out)
	}
	if got, want := slices.Sorted(maps.Keys(rep)), []string{"boot_s", "jobs", "oracle", "policies"}; !slices.Equal(got, want) {
		t.Errorf("top-level names %v, want %v", got, want)
	}
	if rep["jobs"] != 4.0 || rep["boot_s"] != 30.0 {
		t.Errorf("jobs %v, boot_s %v; want 4 and the provider's boot_delay, 30", rep["jobs"], rep["boot_s"])
	}
	if _, ok := rep["oracle"].(map[string]any)["instance_hours"].(float64); !ok {
		t.Errorf("oracle %v has no instance_hours", rep["oracle"])
	}
	policies := rep["policies"].([]any)
	var names []string
	for _, p := range policies {
		p := p.(map[string]any)
		names = append(names, p["name"].(string))
		for _, k := range []string{"name", "min_idle", "idle_ttd_s", "wait_p50_s", "wait_p95_s", "wait_p99_s", "wait_max_s",
			"instance_hours", "idle_hours", "boot_hours", "launches"} {
			if _, ok := p[k]; !ok {
				t.Errorf("policy %v has no %q", p["name"], k)
			}
		}
	}
	// mac's max_instances 2 bounds the grid's min_idle to 0, 1 and 2.
	want := append([]string{"on-demand", "config", "auto"}, slices.Repeat([]string{"grid"}, 3*6)...)
	if !slices.Equal(names, want) {
		t.Errorf("policies %v, want %v", names, want)
	}
	again, _, _ := runSim(t, "--config", f["hangar.toml"], "--trace", f["trace.csv"], "--grid", "-o", "json")
	if again != out {
		t.Error("the same simulation printed different bytes")
	}
}

// TestSimulateTableAndCSV: the table names the oracle and the policies; the
// CSV has a header and a row a policy; --pool picks a pool's rows; an
// unsorted trace is sorted, and said so on stderr.
func TestSimulateTableAndCSV(t *testing.T) {
	f := simFiles(t, map[string]string{
		"hangar.toml": simConfig,
		"trace.csv":   "submit_s,duration_s,pool\n50,60,linux\n10,30,linux\n20,120,mac\n",
		"boots.txt":   "boot_s\n40\n55.5\n70\n",
	})
	out, stderr, code := runSim(t, "--config", f["hangar.toml"], "--trace", f["trace.csv"], "--boot-dist", f["boots.txt"])
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"3 jobs, boot 55.167s", "oracle", "on-demand", "config", "auto", "WAIT_P95"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(stderr, "line 3 is earlier") || !strings.Contains(stderr, "sorted") {
		t.Errorf("stderr %q does not say the trace was sorted from line 3", stderr)
	}
	out, stderr, code = runSim(t, "--config", f["hangar.toml"], "--trace", f["trace.csv"], "--pool", "linux", "--policy", "config", "--boot", "45s", "-o", "csv")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "name,min_idle,idle_ttd_s,wait_p50_s") || !strings.HasPrefix(lines[1], "config,1,300,") ||
		!strings.Contains(lines[1], ",2,45,") {
		t.Errorf("csv:\n%s\nwant a header and config's row for linux's 2 jobs, boot 45", out)
	}
}

// TestSimulateBadInput: every mistake is an error that says where.
func TestSimulateBadInput(t *testing.T) {
	f := simFiles(t, map[string]string{
		"hangar.toml":  simConfig,
		"good.csv":     "submit_s,duration_s\n0,1\n",
		"negative.csv": "submit_s,duration_s\n0,1\n5,-3\n",
		"nan.csv":      "submit_s,duration_s\n0,1\nNaN,3\n",
		"word.csv":     "submit_s,duration_s\n0,1\n2,three\n",
		"unknown.csv":  "submit_s,duration_s,pool\n0,1,linux\n2,3,windows\n",
		"header.csv":   "start,duration_s\n0,1\n",
		"boots.txt":    "40\n0\n",
	})
	cfg := f["hangar.toml"]
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"negative duration", []string{"--trace", f["negative.csv"], "--pool", "linux"}, "negative.csv:3: duration_s: -3 is negative"},
		{"NaN", []string{"--trace", f["nan.csv"], "--pool", "linux"}, "nan.csv:3: submit_s: \"NaN\" is not a finite number"},
		{"not a number", []string{"--trace", f["word.csv"], "--pool", "linux"}, "word.csv:3: duration_s: \"three\" is not a number"},
		{"unknown pool", []string{"--trace", f["unknown.csv"]}, "unknown.csv:3: pool \"windows\" is not in the config (pools: linux, mac)"},
		{"bad header", []string{"--trace", f["header.csv"], "--pool", "linux"}, "header.csv:1: unknown column \"start\""},
		{"missing trace", []string{"--trace", filepath.Join(filepath.Dir(cfg), "none.csv"), "--pool", "linux"}, "none.csv: no such file"},
		{"no pool chosen", []string{"--trace", f["good.csv"]}, "choose one with --pool"},
		{"unknown --pool", []string{"--trace", f["good.csv"], "--pool", "bsd"}, "--pool bsd: the config has no such pool (pools: linux, mac)"},
		{"bad --boot", []string{"--trace", f["good.csv"], "--pool", "linux", "--boot", "soon"}, "--boot \"soon\": want a positive duration"},
		{"bad --boot-dist", []string{"--trace", f["good.csv"], "--pool", "linux", "--boot-dist", f["boots.txt"]}, "boots.txt:2: a boot takes some time"},
		{"bad policy", []string{"--trace", f["good.csv"], "--pool", "linux", "--policy", "cheap"}, "--policy must be on-demand, config, auto or all"},
		{"bad output", []string{"--trace", f["good.csv"], "--pool", "linux", "-o", "yaml"}, "-o must be table, json or csv"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := runSim(t, append([]string{"--config", cfg}, tc.args...)...)
			if code == 0 || !strings.Contains(stderr, tc.want) {
				t.Errorf("exit %d, stderr %q, stdout %q; want an error containing %q", code, stderr, out, tc.want)
			}
		})
	}
}

// A pool smaller than the trace's load is said to measure its queue.
func TestSimulateWarnsOfASmallPool(t *testing.T) {
	f := simFiles(t, map[string]string{
		"hangar.toml": simConfig,
		"trace.csv":   "submit_s,duration_s,pool\n0,60,mac\n1,60,mac\n2,60,mac\n0,60,linux\n",
	})
	_, stderr, code := runSim(t, "--config", f["hangar.toml"], "--trace", f["trace.csv"], "--policy", "config")
	if code != 0 || !strings.Contains(stderr, "pool mac: max_instances 2 is below the 3 jobs the trace runs at once") || strings.Contains(stderr, "pool linux") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}
