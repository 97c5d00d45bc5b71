package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/hangar-ci/hangar/internal/testutil"
)

// stagingConfig is a config with one local provider whose data lives in dir.
func stagingConfig(t *testing.T, dir, extra string) string {
	t.Helper()
	path := filepath.Join(dir, "hangar.toml")
	writeFile(t, path, `[server]
data_dir = "`+filepath.Join(dir, "data")+`"

# Providers and no pools: a config for staging alone.
[providers.here]
type = "local"
`+extra)
	t.Cleanup(func() {
		terminateAll(t, filepath.Join(dir, "data", "local"))
		terminateAll(t, filepath.Join(dir, "data", "local", "regions", "eu-test"))
	})
	return path
}

// TestStagingCLI walks a user through `hangar staging`: each command is a
// new process's worth of manager, finding what the last one left by tags,
// and (on_exit = stop, the default) stopping its servers when done.
func TestStagingCLI(t *testing.T) {
	needStaging(t)
	dir := t.TempDir()
	cfg := stagingConfig(t, dir, "")
	st := func(wantCode int, args ...string) string {
		t.Helper()
		code, out, errOut := runCLI(t, append([]string{"staging", "--config", cfg}, args...)...)
		if code != wantCode {
			t.Fatalf("hangar staging %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, wantCode, out, errOut)
		}
		return out + errOut
	}

	out := st(0, "volume", "create", "data", "--size", "1")
	if !strings.Contains(out, "volume data (vol-") || !strings.Contains(out, "/mnt/Staging/data") {
		t.Fatalf("volume create said: %s", out)
	}
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(filepath.Join(src, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(src, "hello.txt"), "hello\n")
	writeFile(t, filepath.Join(src, "sub", "deep.txt"), "deep\n")
	st(0, "put", src+"/", "vol:data:/tree")
	got := filepath.Join(dir, "got")
	st(0, "get", "vol:data:/tree/", got)
	for _, f := range []string{"hello.txt", "sub/deep.txt"} {
		a, _ := os.ReadFile(filepath.Join(src, f))
		b, err := os.ReadFile(filepath.Join(got, f))
		if err != nil || string(a) != string(b) {
			t.Fatalf("%s after put and get: %q, %v", f, b, err)
		}
	}
	// Without a slash, rsync copies the directory itself.
	st(0, "rsync", "vol:data:/tree", filepath.Join(dir, "whole"))
	if _, err := os.Stat(filepath.Join(dir, "whole", "tree", "hello.txt")); err != nil {
		t.Fatalf("rsync without a trailing slash: %v", err)
	}

	out = st(0, "volumes")
	if !regexp.MustCompile(`(?m)^data\s+vol-\S+\s+1\s`).MatchString(out) {
		t.Fatalf("volumes:\n%s", out)
	}
	out = st(0, "servers")
	m := regexp.MustCompile(`(?m)^(server-\S+)\s+(\S+)\s+stopped\s`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("servers (stopped after each command):\n%s", out)
	}
	server := m[1]

	// On the local cloud a server's "/" is $HANGAR_ROOT.
	out = st(0, "ssh", server, "cat", "$HANGAR_ROOT/mnt/Staging/data/tree/hello.txt")
	if !strings.Contains(out, "hello") {
		t.Fatalf("ssh cat: %s", out)
	}
	st(3, "ssh", server, "exit", "3")
	// Everything after the server is the command, its flags included.
	if out := st(0, "ssh", server, "ls", "-la", "$HANGAR_ROOT/mnt/Staging/data/tree"); !regexp.MustCompile(`(?m)^-.*hello\.txt$`).MatchString(out) {
		t.Fatalf("ssh ls -la:\n%s", out)
	}
	// Not a terminal: rsync's progress line (carriage returns) stays out.
	if strings.Contains(st(0, "put", src+"/", "vol:data:/tree2"), "\r") {
		t.Fatal("put wrote a progress line to a stderr that is not a terminal")
	}
	// -o json names fields as the API does.
	var vols []map[string]any
	if err := json.Unmarshal([]byte(st(0, "volumes", "-o", "json")), &vols); err != nil || len(vols) != 1 || vols[0]["name"] != "data" || vols[0]["fs_type"] != "ext4" || vols[0]["cloud"] == nil {
		t.Fatalf("volumes -o json: %v %v", vols, err)
	}

	snap := strings.TrimSpace(st(0, "snapshot", "data", "--description", "first fill"))
	snapID := regexp.MustCompile(`snap-[0-9a-f]+`).FindString(snap)
	if snapID == "" {
		t.Fatalf("snapshot printed %q", snap)
	}
	if out := st(0, "snapshots"); !strings.Contains(out, snapID) || !strings.Contains(out, "first fill") {
		t.Fatalf("snapshots:\n%s", out)
	}
	out = st(0, "copy-snapshot", snapID, "--to", "eu-test")
	copied := regexp.MustCompile(`snap-[0-9a-f]+`).FindString(out)
	if copied == "" {
		t.Fatalf("copy-snapshot printed %q", out)
	}
	if out := st(0, "snapshots", "--region", "eu-test"); !strings.Contains(out, copied) || strings.Contains(out, snapID) {
		t.Fatalf("snapshots --region eu-test (want %s, not %s):\n%s", copied, snapID, out)
	}

	st(0, "volume", "delete", "data")
	if out := st(0, "volumes"); strings.Contains(out, "data") {
		t.Fatalf("volumes after delete:\n%s", out)
	}
	// The name comes back from its snapshot.
	st(0, "volume", "create", "data", "--size", "2")
	st(0, "get", "vol:data:/tree/hello.txt", filepath.Join(dir, "again.txt"))
	if b, _ := os.ReadFile(filepath.Join(dir, "again.txt")); string(b) != "hello\n" {
		t.Fatalf("volume recreated from its snapshot has %q", b)
	}

	if out := st(0, "terminate-all"); !strings.Contains(out, "terminated 1 staging servers") {
		t.Fatalf("terminate-all: %s", out)
	}
}

func TestStagingCLIErrors(t *testing.T) {
	dir := t.TempDir()
	two := stagingConfig(t, dir, "[providers.other]\ntype = \"local\"\n")
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--config", two, "volumes"}, "choose one with --provider"},
		{[]string{"--config", two, "--provider", "nope", "volumes"}, `no provider "nope"`},
		{[]string{"--config", two, "--provider", "here", "put", "vol:x:/a", "vol:y:/b"}, "put copies local paths"},
		{[]string{"--config", two, "--provider", "here", "get", "/tmp/a", "/tmp/b"}, "get needs a remote source"},
		{[]string{"--config", two, "--provider", "here", "rsync", "vol:Bad Name:/a", "/tmp/b"}, "invalid name"},
		{[]string{"--config", two, "--provider", "here", "copy-snapshot", "snap-1"}, `"to" not set`},
		{[]string{"--config", two, "--provider", "here", "volume", "create", "v", "--fstype", "ntfs", "--size", "1"}, "fstype"},
	}
	for _, tt := range tests {
		code, out, errOut := runCLI(t, append([]string{"staging"}, tt.args...)...)
		if code == 0 || !strings.Contains(out+errOut, tt.want) {
			t.Errorf("hangar staging %s: exit %d, output %q; want an error containing %q", strings.Join(tt.args, " "), code, out+errOut, tt.want)
		}
	}
}

func needStaging(t *testing.T) {
	t.Helper()
	testutil.NeedTools(t, "staging runs against a real sshd and rsync; apt-get install openssh-server openssh-client rsync", "/usr/sbin/sshd", "rsync", "ssh")
	if _, err := os.Stat("/run/sshd"); err != nil && os.Geteuid() == 0 {
		testutil.ToolMissing(t, "/run/sshd is missing: mkdir -p /run/sshd (sshd's privilege-separation directory)")
	}
}
