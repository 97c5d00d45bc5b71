package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut strings.Builder
	code = run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// The CLI against a running server: the whole operator's round.
func TestCLI(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	srv := "--server=" + ts.url

	code, out, errOut := runCLI(t, srv, "lease", "demo", "--wait", "60s", "--worker-name", "w1", "-o", "json")
	if code != 0 {
		t.Fatalf("lease: exit %d: %s", code, errOut)
	}
	var l pool.LeaseView
	if err := json.Unmarshal([]byte(out), &l); err != nil || l.State != pool.LeaseActive || l.Worker.Name != "w1" || l.Worker.Password == "" {
		t.Fatalf("lease -o json = %s (%v)", out, err)
	}
	id := l.Instance.ID
	ts.workerEnv(t, id) // the worker has started, so the console says so

	checks := []struct {
		args []string
		want []string
	}{
		{[]string{"pools"}, []string{"POOL", "demo", "local", "1 leased"}},
		{[]string{"instances", "--pool", "demo"}, []string{id, "leased", l.ID}},
		{[]string{"console", id}, []string{"worker started for lease " + l.ID}},
		{[]string{"scale", "demo", "--min-idle", "1", "--max", "2"}, []string{"pool demo: min_idle 1 (scaled; config 0), max_instances 2 (scaled; config 3)"}},
		{[]string{"drain", id}, []string{"instance " + id + " is draining"}},
		{[]string{"release", l.ID}, []string{"released " + l.ID}},
	}
	for _, c := range checks {
		code, out, errOut := runCLI(t, append([]string{srv}, c.args...)...)
		if code != 0 {
			t.Errorf("hangar %s: exit %d: %s", strings.Join(c.args, " "), code, errOut)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("hangar %s: output lacks %q:\n%s", strings.Join(c.args, " "), w, out)
			}
		}
	}
	// A table never shows the password.
	_, out, _ = runCLI(t, srv, "lease", "demo", "--wait", "60s")
	if strings.Contains(out, l.Worker.Password) || !strings.Contains(out, "active") {
		t.Errorf("lease table:\n%s", out)
	}
	waitGone(t, ts, id)
}

// Clear one-line errors and a non-zero exit for bad arguments, unknown
// things and an unreachable server.
func TestCLIErrors(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	srv := "--server=" + ts.url
	bad := filepath.Join(t.TempDir(), "bad.toml")
	writeFile(t, bad, "[server]\nlisten = \"nowhere\"\n[pools.x]\nmax_instances = \"lots\"\n")
	cases := []struct {
		args []string
		want string
	}{
		{[]string{srv, "lease"}, "accepts 1 arg(s), received 0"},
		{[]string{srv, "lease", "nope"}, `unknown pool "nope"`},
		{[]string{srv, "lease", "demo", "--wait", "soon"}, `invalid argument "soon"`},
		{[]string{srv, "release", "l-nope"}, `unknown lease "l-nope"`},
		{[]string{srv, "scale", "demo"}, "give --min-idle, --max or both"},
		{[]string{srv, "scale", "demo", "--min-idle", "3", "--max", "1"}, "max_instances (1) must be ≥ min_idle (3)"},
		{[]string{srv, "drain", "i-0000000000000000f"}, "unknown instance"},
		{[]string{srv, "pools", "-o", "yaml"}, "-o must be table or json"},
		{[]string{"--server=http://127.0.0.1:1", "pools"}, `cannot reach Hangar at http://127.0.0.1:1: is "hangar serve" running? (--server / HANGAR_SERVER)`},
		{[]string{"--server=127.0.0.1:1", "pools"}, "cannot reach Hangar at http://127.0.0.1:1:"},
		{[]string{"config", "check", bad}, "bad.toml:2: server.listen"},
		{[]string{"config", "check", filepath.Join(t.TempDir(), "missing.toml")}, "missing.toml"},
		{[]string{"userdata", "render", "nope", "--config", bad}, "bad.toml"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
	}
	for _, c := range cases {
		code, out, errOut := runCLI(t, c.args...)
		if code == 0 || !strings.HasPrefix(errOut, "hangar: ") || !strings.Contains(errOut, c.want) {
			t.Errorf("hangar %s: exit %d, stdout %q, stderr %q; want an error containing %q", strings.Join(c.args, " "), code, out, errOut, c.want)
		}
	}
}

func TestCLIConfigAndUserData(t *testing.T) {
	code, out, errOut := runCLI(t, "config", "check", "../../configs/local.toml")
	if code != 0 || !strings.Contains(out, "ok (1 providers, 1 pools)") {
		t.Errorf("config check local.toml: %d %q %q", code, out, errOut)
	}
	// Its secrets and certificate live on the serving machine: --offline
	// checks the rest.
	code, out, errOut = runCLI(t, "config", "check", "--offline", "../../configs/ec2.example.toml")
	if code != 0 {
		t.Errorf("config check --offline ec2.example.toml: %d %q %q", code, out, errOut)
	}
	code, _, errOut = runCLI(t, "config", "check", "../../configs/ec2.example.toml")
	if code == 0 || !strings.Contains(errOut, "HANGAR_BUILDBOT_TOKEN is not set") {
		t.Errorf("config check ec2.example.toml away from its machine: %d %q", code, errOut)
	}
	// With no --config and no ./hangar.toml, the embedded default is used.
	dir := t.TempDir()
	t.Chdir(dir)
	code, out, errOut = runCLI(t, "userdata", "render", "demo")
	if code != 0 || !strings.HasPrefix(out, "#!/bin/bash") || !strings.Contains(out, "TOKEN-PLACEHOLDER") || !strings.Contains(out, "/bootstrap/v1/script") {
		t.Errorf("userdata render demo: %d\n%s\n%s", code, out, errOut)
	}
	// ./hangar.toml wins over the default.
	writeFile(t, filepath.Join(dir, "hangar.toml"), testTOML(dir, "other", ""))
	code, out, errOut = runCLI(t, "userdata", "render", "other")
	if code != 0 || !strings.Contains(out, "HANGAR_POOL='other'") {
		t.Errorf("userdata render other with ./hangar.toml: %d\n%s\n%s", code, out, errOut)
	}
}

// Local instances outlive `hangar serve`, as cloud instances do;
// `hangar local terminate-all` ends them all.
func TestCLILocalTerminateAll(t *testing.T) {
	dir := t.TempDir()
	cfgText := testTOML(filepath.Join(dir, "data"), "demo", "min_idle = 2")
	ts := startTest(t, cfgText, nil)
	testutil.Eventually(t, "2 idle instances", 30*time.Second, func() bool { return ts.countState(t, "demo", pool.Idle) == 2 })
	list := ts.instances(t, "demo")
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	for _, in := range list {
		if len(instanceProcs(in.ID)) == 0 {
			t.Fatalf("instance %s ended with the server", in.ID)
		}
	}
	path := filepath.Join(dir, "hangar.toml")
	writeFile(t, path, cfgText)
	code, out, errOut := runCLI(t, "local", "terminate-all", "--config", path)
	if code != 0 || !strings.Contains(out, "terminated 2 instances") {
		t.Fatalf("local terminate-all: %d %q %q", code, out, errOut)
	}
	for _, in := range list {
		if pids := instanceProcs(in.ID); len(pids) > 0 {
			t.Errorf("instance %s: processes %v survived", in.ID, pids)
		}
	}
}
