package configs

import (
	"os"
	"path/filepath"
	"testing"
)

// A bootstrap file is checked as it will be served: its includes must
// resolve (a missing one is a config error naming the script's line, not
// an instance that never reports ready), and its worker-command line is
// its pools' worker_command unless they set one, as a built-in script's.
func TestBootstrapFileIncludes(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"ci/ok.sh":     "#!/bin/bash\n# hangar:worker-command exec my-worker\n# hangar:include builtin:generic.sh\n",
		"ci/broken.sh": "#!/bin/bash\n\n# hangar:include lib/gone.sh\n",
	} {
		path := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	repoScript, err := filepath.Abs(filepath.Join("..", "scripts", "bootstrap", "buildbot-worker.sh"))
	if err != nil {
		t.Fatal(err)
	}
	name := filepath.Join(dir, "hangar.toml")
	toml := `[providers.local]
type = "local"
[pools.broken]
provider = "local"
bootstrap = "ci/broken.sh"
[pools.ok]
provider = "local"
bootstrap = "ci/ok.sh"
[pools.own]
provider = "local"
bootstrap = "ci/ok.sh"
worker_command = "exec other-worker"
[pools.bb]
provider = "local"
bootstrap = "` + repoScript + `"
`
	_, err = Parse(name, []byte(toml))
	want := name + ":5: pools.broken.bootstrap: " + filepath.Join(dir, "ci", "broken.sh") + ":3: including lib/gone.sh: open " +
		filepath.Join(dir, "ci", "lib", "gone.sh") + ": no such file or directory"
	if err == nil || err.Error() != want {
		t.Fatalf("got:\n%v\nwant:\n%s", err, want)
	}

	if err := os.WriteFile(filepath.Join(dir, "ci", "broken.sh"), []byte("#!/bin/bash\n# hangar:include ok.sh\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Parse(name, []byte(toml))
	want = name + ":5: pools.broken.bootstrap: " + filepath.Join(dir, "ci", "broken.sh") + ":2: including ok.sh: " +
		filepath.Join(dir, "ci", "ok.sh") + ":3: an included file cannot include another: includes do not nest"
	if err == nil || err.Error() != want {
		t.Fatalf("got:\n%v\nwant:\n%s", err, want)
	}

	if err := os.Remove(filepath.Join(dir, "ci", "broken.sh")); err != nil {
		t.Fatal(err)
	}
	c, err := Parse(name, []byte(toml[:len(`[providers.local]
type = "local"
`)]+toml[len(`[providers.local]
type = "local"
[pools.broken]
provider = "local"
bootstrap = "ci/broken.sh"
`):]))
	if err != nil {
		t.Fatal(err)
	}
	for pool, want := range map[string]string{
		"ok":  "exec my-worker",
		"own": "exec other-worker",
		"bb":  `exec bash "$HANGAR_BUILDBOT_START"`,
	} {
		if got := c.Pools[pool].WorkerCommand; got != want {
			t.Errorf("pools.%s.worker_command = %q, want %q", pool, got, want)
		}
	}
}
