package scripts

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A bootstrap file's includes are files relative to it, or built-in
// scripts by builtin: name; whatever cannot be included is an error that
// names the file and line, never a script served without its protocol.
func TestExpandFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		t.Helper()
		path := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	write("lib/common.sh", "#!/bin/bash\ncommon=1\n")
	write("lib/no-newline.sh", "last=1")
	write("lib/nested.sh", "x=1\n# hangar:include common.sh\n")
	abs := write("abs.sh", "#!/bin/sh\nabs=1\n")
	generic, err := BootstrapScript("generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	_, genericBody, _ := bytes.Cut(generic, []byte("\n"))

	cases := []struct {
		name, body string
		want       string // the expansion, with GENERIC for generic.sh's body
		err        string
	}{
		{name: "plain.sh", body: "#!/bin/bash\necho plain\n", want: "#!/bin/bash\necho plain\n"},
		{name: "relative.sh", body: "#!/bin/bash\n# hangar:include lib/common.sh\necho after\n",
			want: "#!/bin/bash\ncommon=1\necho after\n"},
		{name: "absolute.sh", body: "# hangar:include " + abs + "\n", want: "abs=1\n"},
		{name: "newline.sh", body: "# hangar:include lib/no-newline.sh\necho after\n", want: "last=1\necho after\n"},
		{name: "builtin.sh", body: "#!/bin/bash\nmine=1\n# hangar:include builtin:generic.sh\n",
			want: "#!/bin/bash\nmine=1\nGENERIC"},
		{name: "crlf.sh", body: "#!/bin/bash\r\n# hangar:include lib/common.sh\r\n", want: "#!/bin/bash\r\ncommon=1\n"},
		{name: "missing.sh", body: "#!/bin/bash\n\n# hangar:include lib/missing.sh\n",
			err: "missing.sh:3: including lib/missing.sh: open " + filepath.Join(dir, "lib", "missing.sh") + ": no such file or directory"},
		// A copy of a built-in script taken out of the repository.
		{name: "copy.sh", body: "#!/bin/bash\n# hangar:include generic.sh\n",
			err: "copy.sh:2: including generic.sh: open " + filepath.Join(dir, "generic.sh") + ": no such file or directory (for the built-in script, write # hangar:include builtin:generic.sh)"},
		{name: "nobuiltin.sh", body: "# hangar:include builtin:nope.sh\n",
			err: `nobuiltin.sh:1: including builtin:nope.sh: no built-in bootstrap script "nope.sh"`},
		{name: "nested.sh", body: "# hangar:include lib/nested.sh\n",
			err: "nested.sh:1: including lib/nested.sh: " + filepath.Join(dir, "lib", "nested.sh") + ":2: an included file cannot include another"},
		{name: "empty.sh", body: "# hangar:include \n", err: "empty.sh:1: # hangar:include names no script"},
		{name: "dir.sh", body: "# hangar:include lib\n", err: "dir.sh:1: including lib: read " + filepath.Join(dir, "lib") + ": is a directory"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := write(c.name, c.body)
			got, err := ExpandFile(path)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) || !strings.HasPrefix(err.Error(), path+":") {
					t.Errorf("error = %v\nwant one starting %s: with %q", err, path, c.err)
				}
				return
			}
			want := strings.ReplaceAll(c.want, "GENERIC", string(genericBody))
			if err != nil || string(got) != want {
				t.Errorf("ExpandFile = %q, %v\nwant %q", got, err, want)
			}
		})
	}
}

// The repository's scripts/bootstrap/buildbot-worker.sh given as a file is
// served as builtin:buildbot-worker.sh is: its include of generic.sh is a
// file next to it.
func TestExpandFileOfBuiltinScript(t *testing.T) {
	for _, name := range []string{"buildbot-worker.sh", "jenkins-agent.sh", "generic.sh"} {
		file, err := ExpandFile(filepath.Join("bootstrap", name))
		if err != nil {
			t.Fatal(err)
		}
		builtin, err := BootstrapScript(name)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(file, builtin) {
			t.Errorf("bootstrap/%s as a file differs from builtin:%s", name, name)
		}
		if got, want := WorkerCommand(file), DefaultWorkerCommand(name); got != want {
			t.Errorf("WorkerCommand(bootstrap/%s) = %q, want %q", name, got, want)
		}
	}
}

// A script fetched from a URL has no directory to include files from.
func TestExpandFetched(t *testing.T) {
	got, err := Expand("https://ci.example/boot.sh", []byte("#!/bin/bash\n# hangar:include builtin:generic.sh\n"), "", nil)
	if err != nil || !bytes.Contains(got, []byte("hangar-bootstrap")) || bytes.Contains(got, []byte(includeDirective)) {
		t.Errorf("builtin include in a fetched script: %.80q, %v", got, err)
	}
	_, err = Expand("https://ci.example/boot.sh", []byte("#!/bin/bash\n# hangar:include lib.sh\n"), "", nil)
	if want := "https://ci.example/boot.sh:2: including lib.sh: a script fetched from a URL can include only built-in scripts"; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("file include in a fetched script: error %v, want %q", err, want)
	}
}
