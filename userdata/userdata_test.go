package userdata

import (
	"bytes"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"mime"
	"mime/multipart"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

const testToken = "tok_ABCdef-0123456789"

const userCloudConfig = "#cloud-config\npackages:\n  - git\nruncmd:\n  - [echo, hello from the pool's own cloud-config]\n"

// hostileEnv holds values that break naive quoting; every one must reach the
// bootstrap script byte for byte. Those that are not plain text also force
// the base64 forms of cloud-config and MIME.
var plainHostileEnv = map[string]string{
	"SINGLE":    `'; touch pwned #`,
	"SUBST":     `$(touch pwned2)`,
	"BACKTICKS": "`touch pwned3`",
	"LINES":     "line 1\nline 2\n\n  indented\t'\"\\\n",
	"QUOTES":    `it's "double" and 'single' and '\''`,
	"SPACES":    "trailing spaces   \n   ",
	"EMPTY":     "",
	"DASHES":    "--===============hangar0==\n---\n...",
}

var binaryHostileEnv = map[string]string{
	"CRLF":    "a\r\nb",
	"CONTROL": "bell\a esc\x1b del\x7f",
	"UTF8":    "héllo ✓",
	"LATIN1":  "caf\xe9",
}

func testParams(format Format) Params {
	p := Params{
		Pool:           "demo",
		HangarURL:      "https://hangar.example.com:7878/",
		BootstrapToken: testToken,
		Env: map[string]string{
			"EXAMPLE": "value",
			"QUOTED":  "it's \"quoted\"\nand $(not run)",
		},
		Format: format,
	}
	if format == FormatMIME {
		p.CloudConfig = userCloudConfig
	}
	return p
}

func withEnv(p Params, env map[string]string) Params {
	p.Env = env
	return p
}

// enrolling makes p a batch's user-data, with identity.
func enrolling(p Params, identity string) Params {
	p.Enroll, p.Identity = true, identity
	return p
}

func mustRender(t *testing.T, p Params) []byte {
	t.Helper()
	b, err := Render(p)
	if err != nil {
		t.Fatalf("Render: %v", err)
	}
	return b
}

func TestRenderGolden(t *testing.T) {
	tests := []struct {
		golden string
		params Params
	}{
		{"script.golden", testParams(FormatScript)},
		{"script-default-format.golden", testParams("")},
		{"cloud-config.golden", testParams(FormatCloudConfig)},
		{"cloud-config-b64.golden", withEnv(testParams(FormatCloudConfig), map[string]string{"CRLF": "a\r\nb"})},
		{"mime.golden", testParams(FormatMIME)},
		{"mime-script-only.golden", func() Params { p := testParams(FormatMIME); p.CloudConfig = ""; return p }()},
		{"mime-b64.golden", withEnv(testParams(FormatMIME), map[string]string{"UTF8": "héllo ✓"})},
		{"script-enroll.golden", enrolling(testParams(FormatScript), "")},
		{"script-enroll-signed.golden", enrolling(testParams(FormatScript), IdentitySigned)},
		{"cloud-config-enroll-signed.golden", enrolling(testParams(FormatCloudConfig), IdentitySigned)},
	}
	for _, tt := range tests {
		t.Run(tt.golden, func(t *testing.T) {
			got := mustRender(t, tt.params)
			path := filepath.Join("testdata", tt.golden)
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("reading golden file (run go test -update to create it): %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("Render differs from %s (run go test -update to accept):\n%s", path, got)
			}
			if len(got) > MaxSize {
				t.Errorf("golden user-data is %d bytes, over MaxSize", len(got))
			}
		})
	}
}

// What an instance's shell would export, read back from the rendered
// script: the quoting undone, bare words taken as they are.
func TestExports(t *testing.T) {
	p := Params{Pool: "demo", HangarURL: "http://127.0.0.1:7878", BootstrapToken: "tok-en_1", Enroll: true,
		Env: map[string]string{"GREETING": "it's $(not run)"}}
	ud, err := Render(p)
	if err != nil {
		t.Fatal(err)
	}
	got := Exports(ud)
	want := map[string]string{"HANGAR_URL": "http://127.0.0.1:7878", "HANGAR_POOL": "demo", "HANGAR_BOOTSTRAP_TOKEN": "tok-en_1",
		"HANGAR_ENROLL": "1", "GREETING": "it's $(not run)"}
	if !maps.Equal(got, want) {
		t.Errorf("Exports = %v\nwant %v", got, want)
	}
}

func TestRenderErrors(t *testing.T) {
	tests := []struct {
		name   string
		params Params
		want   string
	}{
		{
			name: "everything wrong at once",
			params: Params{
				Pool:           "Bad Pool",
				HangarURL:      "ftp://user:pw@host/",
				BootstrapToken: "secret token!",
				Env:            map[string]string{"1BAD": "x", "HANGAR_URL": "y", "NUL": "a\x00b", "SHELLOPTS": "xtrace"},
				Format:         "yaml",
			},
			want: `pool: invalid name "Bad Pool": use 1 to 63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit
hangar url: "ftp://user:pw@host/": scheme must be http or https
bootstrap token: has characters other than A-Z, a-z, 0-9, '_' and '-'
env: invalid env name "1BAD": use letters, digits and '_', not starting with a digit
env: invalid env name "HANGAR_URL": the prefix HANGAR_ is reserved for Hangar's own variables
env "NUL": value contains a NUL byte, which no environment can hold
env: invalid env name "SHELLOPTS": it changes how the bootstrap script runs
format: unknown format "yaml" (want "script", "cloud-config" or "mime")`,
		},
		{
			name:   "empty",
			params: Params{},
			want: `pool: invalid name "": use 1 to 63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit
hangar url: empty
bootstrap token: empty`,
		},
		{
			name:   "url with userinfo",
			params: Params{Pool: "p", HangarURL: "https://u@h", BootstrapToken: "t"},
			want:   `hangar url: "https://u@h": must not carry a user or password`,
		},
		{
			name:   "url with query",
			params: Params{Pool: "p", HangarURL: "https://h/?a=b", BootstrapToken: "t"},
			want:   `hangar url: "https://h/?a=b": must not have a query or fragment`,
		},
		{
			name:   "url with empty fragment",
			params: Params{Pool: "p", HangarURL: "https://h/#", BootstrapToken: "t"},
			want:   `hangar url: "https://h/#": must not have a query or fragment`,
		},
		{
			name:   "url without host",
			params: Params{Pool: "p", HangarURL: "http:///path", BootstrapToken: "t"},
			want:   `hangar url: "http:///path": has no host`,
		},
		{
			name:   "cloud config without mime",
			params: Params{Pool: "p", HangarURL: "http://h", BootstrapToken: "t", Format: FormatCloudConfig, CloudConfig: userCloudConfig},
			want:   `cloud config: only the "mime" format can carry one`,
		},
		{
			name:   "unknown identity",
			params: Params{Pool: "p", HangarURL: "http://h", BootstrapToken: "t", Enroll: true, Identity: "pkcs7"},
			want:   `identity: unknown identity "pkcs7" (want "signed" or nothing)`,
		},
		{
			name:   "identity without enroll",
			params: Params{Pool: "p", HangarURL: "http://h", BootstrapToken: "t", Identity: IdentitySigned},
			want:   `identity: only an enrolling (batch) user-data sends one`,
		},
		{
			name:   "cloud config without header",
			params: Params{Pool: "p", HangarURL: "http://h", BootstrapToken: "t", Format: FormatMIME, CloudConfig: "packages: [git]\n"},
			want:   `cloud config: must start with "#cloud-config"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Render(tt.params)
			if err == nil {
				t.Fatalf("Render succeeded, want error:\n%s", tt.want)
			}
			if err.Error() != tt.want {
				t.Errorf("Render error:\n%s\nwant:\n%s", err, tt.want)
			}
		})
	}
}

func TestRenderSizeLimit(t *testing.T) {
	for _, format := range []Format{FormatScript, FormatCloudConfig, FormatMIME} {
		t.Run(string(format), func(t *testing.T) {
			p := Params{Pool: "demo", HangarURL: "http://127.0.0.1:7878", BootstrapToken: testToken, Format: format,
				Env: map[string]string{"BIG": ""}}
			base := len(mustRender(t, p))
			// One byte of value is one byte of user-data: one line for the
			// indented YAML block, short lines so the MIME part stays 7bit.
			line := strings.Repeat("x", 79) + "\n"
			if format != FormatMIME {
				line = "x"
			}
			p.Env["BIG"] = strings.Repeat(line, MaxSize)[:MaxSize-base]
			if got := len(mustRender(t, p)); got != MaxSize {
				t.Fatalf("user-data is %d bytes, want exactly %d", got, MaxSize)
			}
			p.Env["BIG"] += "x"
			_, err := Render(p)
			want := fmt.Sprintf("rendered user-data is %d bytes, over EC2's limit of 16384", MaxSize+1)
			if err == nil || err.Error() != want {
				t.Errorf("Render error: %v, want %q", err, want)
			}
		})
	}
}

// TestFormatsCarryTheSameScript checks that the cloud-config and MIME forms
// embed the script form byte for byte, with Go's own MIME reader.
func TestFormatsCarryTheSameScript(t *testing.T) {
	for _, env := range []map[string]string{plainHostileEnv, binaryHostileEnv} {
		p := withEnv(testParams(FormatScript), env)
		script := string(mustRender(t, p))

		p.Format = FormatMIME
		p.CloudConfig = userCloudConfig
		parts := mimeParts(t, mustRender(t, p))
		if len(parts) != 2 {
			t.Fatalf("MIME has %d parts, want 2", len(parts))
		}
		if parts[0].contentType != "text/x-shellscript" || parts[0].body != script {
			t.Errorf("first MIME part is %s:\n%s\nwant text/x-shellscript:\n%s", parts[0].contentType, parts[0].body, script)
		}
		if parts[1].contentType != "text/cloud-config" || parts[1].body != userCloudConfig {
			t.Errorf("second MIME part is %s:\n%s\nwant text/cloud-config:\n%s", parts[1].contentType, parts[1].body, userCloudConfig)
		}
	}
}

func mimeParts(t *testing.T, msg []byte) []mimePart {
	t.Helper()
	m, err := mail.ReadMessage(bytes.NewReader(msg))
	if err != nil {
		t.Fatalf("reading MIME message: %v", err)
	}
	mediaType, params, err := mime.ParseMediaType(m.Header.Get("Content-Type"))
	if err != nil || mediaType != "multipart/mixed" || m.Header.Get("MIME-Version") != "1.0" {
		t.Fatalf("MIME headers: %v (%v)", m.Header, err)
	}
	var parts []mimePart
	r := multipart.NewReader(m.Body, params["boundary"])
	for {
		part, err := r.NextPart()
		if errors.Is(err, io.EOF) {
			return parts
		}
		if err != nil {
			t.Fatalf("reading MIME part: %v", err)
		}
		body, err := io.ReadAll(part)
		if err != nil {
			t.Fatalf("reading MIME part: %v", err)
		}
		if part.Header.Get("Content-Transfer-Encoding") == "base64" {
			if body, err = base64.StdEncoding.DecodeString(strings.ReplaceAll(string(body), "\n", "")); err != nil {
				t.Fatalf("decoding MIME part: %v", err)
			}
		}
		contentType, _, _ := mime.ParseMediaType(part.Header.Get("Content-Type"))
		_, disposition, _ := mime.ParseMediaType(part.Header.Get("Content-Disposition"))
		parts = append(parts, mimePart{contentType: contentType, filename: disposition["filename"], body: string(body)})
	}
}

func TestMIMEBoundaryAvoidsContent(t *testing.T) {
	parts := []mimePart{{contentType: "text/x-shellscript", filename: "a", body: "--===============hangar0==\n===============hangar1==\n"}}
	got := renderMIME(parts)
	if !strings.Contains(got, `boundary="===============hangar2=="`) {
		t.Errorf("boundary does not skip the two in the content:\n%s", got)
	}
}

// TestRenderEnroll: a batch's user-data exports HANGAR_ENROLL=1 (and the
// identity asked for) next to the batch token, and is otherwise the same
// script as an instance's; an instance's exports neither.
func TestRenderEnroll(t *testing.T) {
	plain := string(mustRender(t, testParams(FormatScript)))
	for _, c := range []struct {
		identity string
		want     string
	}{
		{"", "export HANGAR_ENROLL=1\n"},
		{IdentitySigned, "export HANGAR_ENROLL=1\nexport HANGAR_IDENTITY='signed'\n"},
	} {
		got := string(mustRender(t, enrolling(testParams(FormatScript), c.identity)))
		token := "export HANGAR_BOOTSTRAP_TOKEN='" + testToken + "'\n"
		if !strings.Contains(got, token+c.want+"export EXAMPLE=") {
			t.Errorf("identity %q: the script does not export %q after the token:\n%s", c.identity, c.want, got)
		}
		if strings.Replace(got, c.want, "", 1) != plain {
			t.Errorf("identity %q: the script differs from an instance's by more than %q", c.identity, c.want)
		}
	}
	if strings.Contains(plain, "HANGAR_ENROLL") || strings.Contains(plain, "HANGAR_IDENTITY") {
		t.Errorf("an instance's user-data speaks of enrollment:\n%s", plain)
	}
}
