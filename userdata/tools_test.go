package userdata

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/hangar-ci/hangar/internal/testutil"
)

// These tests hand the rendered user-data to the tools that will read it on
// the instance; each is skipped when its tool is not installed, and fails
// then under HANGAR_REQUIRE_TOOLS=1 (as in CI).

func needTool(t *testing.T, name string) string {
	t.Helper()
	return testutil.NeedTool(t, name, "the user-data check's tool; .ci/run installs it")
}

func writeTemp(t *testing.T, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestCloudInitSchema(t *testing.T) {
	cloudInit := needTool(t, "cloud-init")
	mime := mustRender(t, testParams(FormatMIME))
	tests := []struct {
		name   string
		config []byte
	}{
		{"cloud-config form", mustRender(t, testParams(FormatCloudConfig))},
		{"cloud-config form with hostile env", mustRender(t, withEnv(testParams(FormatCloudConfig), plainHostileEnv))},
		{"cloud-config form in base64", mustRender(t, withEnv(testParams(FormatCloudConfig), binaryHostileEnv))},
		{"cloud-config part of the MIME form", []byte(mimeParts(t, mime)[1].body)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeTemp(t, "user-data.yaml", tt.config)
			out, err := exec.Command(cloudInit, "schema", "--config-file", path).CombinedOutput()
			if err != nil {
				t.Errorf("cloud-init schema: %v\n%s\n%s", err, out, tt.config)
			}
		})
	}
}

// TestCloudConfigYAML checks with PyYAML, the parser cloud-init uses, that
// the script written by write_files is the script form byte for byte.
func TestCloudConfigYAML(t *testing.T) {
	python := needTool(t, "python3")
	testutil.NeedPythonModule(t, python, "yaml", "PyYAML, the parser cloud-init uses: apt-get install python3-yaml")
	const extract = `
import base64, sys, yaml
config = yaml.safe_load(open(sys.argv[1], "rb"))
assert config["runcmd"] == [["/var/lib/hangar/bootstrap-userdata.sh"]], config["runcmd"]
(f,) = config["write_files"]
assert f["path"] == "/var/lib/hangar/bootstrap-userdata.sh" and f["permissions"] == "0700", f
content = f["content"]
sys.stdout.buffer.write(base64.b64decode(content) if f.get("encoding") == "b64" else content.encode())
`
	for _, env := range []map[string]string{plainHostileEnv, binaryHostileEnv} {
		p := withEnv(testParams(FormatScript), env)
		want := string(mustRender(t, p))
		p.Format = FormatCloudConfig
		path := writeTemp(t, "user-data.yaml", mustRender(t, p))
		got, err := exec.Command(python, "-c", extract, path).Output()
		if err != nil {
			t.Fatalf("extracting the script with PyYAML: %v", err)
		}
		if string(got) != want {
			t.Errorf("script in cloud-config:\n%q\nwant:\n%q", got, want)
		}
	}
}

// TestMIMEPython checks with Python's email package, which cloud-init uses
// to split MIME user-data, that the parts arrive byte for byte.
func TestMIMEPython(t *testing.T) {
	python := needTool(t, "python3")
	const extract = `
import email, sys
msg = email.message_from_binary_file(open(sys.argv[1], "rb"))
parts = [p for p in msg.walk() if not p.is_multipart()]
assert [p.get_content_type() for p in parts] == ["text/x-shellscript", "text/cloud-config"], parts
assert [p.get_filename() for p in parts] == ["hangar-userdata.sh", "cloud-config.yaml"]
sys.stdout.buffer.write(parts[0].get_payload(decode=True))
`
	for _, env := range []map[string]string{plainHostileEnv, binaryHostileEnv} {
		p := withEnv(testParams(FormatScript), env)
		want := string(mustRender(t, p))
		p.Format = FormatMIME
		p.CloudConfig = userCloudConfig
		path := writeTemp(t, "user-data.mime", mustRender(t, p))
		got, err := exec.Command(python, "-c", extract, path).Output()
		if err != nil {
			t.Fatalf("extracting the script with Python's email package: %v", err)
		}
		if string(got) != want {
			t.Errorf("script in MIME:\n%q\nwant:\n%q", got, want)
		}
	}
}

func TestShellcheck(t *testing.T) {
	shellcheck := needTool(t, "shellcheck")
	for _, env := range []map[string]string{nil, plainHostileEnv, binaryHostileEnv} {
		path := writeTemp(t, "user-data.sh", mustRender(t, withEnv(testParams(FormatScript), env)))
		// Below warning, shellcheck only wonders whether $(...) in single
		// quotes was meant literally, which for env values it was.
		if out, err := exec.Command(shellcheck, "--severity=warning", path).CombinedOutput(); err != nil {
			t.Errorf("shellcheck: %v\n%s", err, out)
		}
	}
}
