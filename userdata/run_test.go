package userdata

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/internal/shell"
)

// runUserData runs user-data with bash the way cloud-init would, in dir and
// with a clean environment, and returns its output and exit code.
func runUserData(t *testing.T, dir, path string, env ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", path)
	cmd.Dir = dir
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + dir,
		"TMPDIR=" + dir,
		// Never let a test read a token file of the machine running it.
		"HANGAR_ROOT=" + dir,
		// Never let a test install a per-boot script on the machine running it.
		"HANGAR_USERDATA_CLOUD_DIR=" + filepath.Join(dir, "cloud"),
	}, env...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &exit):
		return string(out), exit.ExitCode()
	default:
		t.Fatalf("running user-data: %v\n%s", err, out)
		return "", 0
	}
}

// bootstrapServer serves a bootstrap script that dumps its environment, after
// answering failStatus to the first failures fetches.
func bootstrapServer(t *testing.T, token, envFile string, failures int, failStatus int) (*httptest.Server, *atomic.Int32) {
	var fetches atomic.Int32
	script := "#!/bin/bash\nenv -0 > " + shell.Quote(envFile) + "\nstat -c %a \"$0\" > " + shell.Quote(envFile+".mode") + "\n"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := fetches.Add(1)
		switch {
		case r.URL.Path != "/bootstrap/v1/script" || r.Method != http.MethodGet:
			http.NotFound(w, r)
		case r.Header.Get("Authorization") != "Bearer "+token:
			http.Error(w, "unknown token", http.StatusUnauthorized)
		case int(n) <= failures:
			http.Error(w, "try again", failStatus)
		default:
			_, _ = w.Write([]byte(script))
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &fetches
}

func TestRunUserData(t *testing.T) {
	tests := []struct {
		name       string
		failures   int
		failStatus int
		wrongToken bool
		wantExit   int
		wantOut    []string
		wantFetch  int32
	}{
		{name: "hostile env arrives literally", wantFetch: 1,
			wantOut: []string{"hangar-userdata: running the bootstrap script of pool demo"}},
		{name: "a 500 is retried", failures: 1, failStatus: 500, wantFetch: 2,
			wantOut: []string{"failed (HTTP status 500); retrying in 1s", "running the bootstrap script"}},
		{name: "a 401 for ever gives up", wrongToken: true, wantExit: 1, wantFetch: 2,
			wantOut: []string{"returned error: 401", "hangar-userdata: giving up: fetching http://127.0.0.1:", "failed 2 times in ", "(last HTTP status 401;"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			envFile := filepath.Join(dir, "env.out")
			serverToken := testToken
			if tt.wrongToken {
				serverToken = "another-token"
			}
			srv, fetches := bootstrapServer(t, serverToken, envFile, tt.failures, tt.failStatus)

			env := maps.Clone(plainHostileEnv)
			maps.Copy(env, binaryHostileEnv)
			env["SINGLE"] = "'; touch " + filepath.Join(dir, "pwned") + " #"
			env["SUBST"] = "$(touch " + filepath.Join(dir, "pwned2") + ")"
			env["BACKTICKS"] = "`touch " + filepath.Join(dir, "pwned3") + "`"
			p := Params{Pool: "demo", HangarURL: srv.URL + "/", BootstrapToken: testToken, Env: env}
			path := filepath.Join(dir, "user-data")
			if err := os.WriteFile(path, mustRender(t, p), 0o700); err != nil {
				t.Fatal(err)
			}

			// One retry after a second is enough for the 401 case.
			out, code := runUserData(t, dir, path, "HANGAR_USERDATA_FETCH_ATTEMPTS=2")
			if code != tt.wantExit {
				t.Errorf("exit code %d, want %d; output:\n%s", code, tt.wantExit, out)
			}
			for _, want := range tt.wantOut {
				if !strings.Contains(out, want) {
					t.Errorf("output lacks %q:\n%s", want, out)
				}
			}
			if strings.Contains(out, testToken) {
				t.Errorf("output shows the token:\n%s", out)
			}
			if got := fetches.Load(); got != tt.wantFetch {
				t.Errorf("%d fetches, want %d", got, tt.wantFetch)
			}
			for _, pwned := range []string{"pwned", "pwned2", "pwned3"} {
				if _, err := os.Stat(filepath.Join(dir, pwned)); err == nil {
					t.Errorf("an env value ran a command: %s exists", pwned)
				}
			}
			if tt.wantExit != 0 {
				return
			}

			got := readEnv(t, envFile)
			want := maps.Clone(env)
			want["HANGAR_URL"] = srv.URL
			want["HANGAR_POOL"] = "demo"
			want["HANGAR_BOOTSTRAP_TOKEN"] = testToken
			for k, v := range want {
				if g, ok := got[k]; !ok || g != v {
					t.Errorf("bootstrap script got %s=%q (exported: %v), want %q", k, g, ok, v)
				}
			}
			if mode, _ := os.ReadFile(envFile + ".mode"); string(mode) != "700\n" {
				t.Errorf("downloaded bootstrap script has mode %q, want 700", mode)
			}
		})
	}
}

// readEnv parses the output of env -0, which survives any value.
func readEnv(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("the bootstrap script did not run: %v", err)
	}
	env := map[string]string{}
	for _, kv := range bytes.Split(bytes.TrimSuffix(data, []byte{0}), []byte{0}) {
		k, v, _ := strings.Cut(string(kv), "=")
		env[k] = v
	}
	return env
}

func TestPerBootCopy(t *testing.T) {
	dir := t.TempDir()
	envFile := filepath.Join(dir, "env.out")
	srv, fetches := bootstrapServer(t, testToken, envFile, 0, 0)
	perBoot := filepath.Join(dir, "cloud", "scripts", "per-boot")
	instanceID := filepath.Join(dir, "cloud", "data", "instance-id")
	for _, d := range []string{perBoot, filepath.Dir(instanceID)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(instanceID, []byte("i-0123\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	userData := mustRender(t, Params{Pool: "demo", HangarURL: srv.URL, BootstrapToken: testToken})
	path := filepath.Join(dir, "part-001")
	if err := os.WriteFile(path, userData, 0o700); err != nil {
		t.Fatal(err)
	}

	out, code := runUserData(t, dir, path)
	copyPath := filepath.Join(perBoot, "hangar-userdata-i-0123.sh")
	if code != 0 || !strings.Contains(out, "installed "+copyPath) {
		t.Fatalf("first boot: exit code %d, output:\n%s", code, out)
	}
	st, err := os.Stat(copyPath)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("per-boot copy: %v, %v", st, err)
	}
	if got, _ := os.ReadFile(copyPath); !bytes.Equal(got, userData) {
		t.Errorf("per-boot copy differs from the user-data")
	}

	// A later boot runs the copy, which must bootstrap and not copy again.
	out, code = runUserData(t, dir, copyPath)
	if code != 0 || strings.Contains(out, "installed") || fetches.Load() != 2 {
		t.Errorf("second boot: exit code %d, %d fetches, output:\n%s", code, fetches.Load(), out)
	}

	// An instance made from an image of this one must not run the copy.
	if err := os.WriteFile(instanceID, []byte("i-0456\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, code = runUserData(t, dir, copyPath)
	if code != 0 || !strings.Contains(out, "left over from the instance this image was made from") || fetches.Load() != 2 {
		t.Errorf("boot of another instance: exit code %d, %d fetches, output:\n%s", code, fetches.Load(), out)
	}
	if _, err := os.Stat(copyPath); err == nil {
		t.Errorf("the left-over copy still exists")
	}
}

// After a stop and start the user-data runs with the token it was made
// with: it uses the token the bootstrap saved instead, but only one that
// descends from its own.
func TestSavedToken(t *testing.T) {
	const rotated = "tok_rotated-42"
	hash := func(s string) string { sum := sha256.Sum256([]byte(s)); return hex.EncodeToString(sum[:]) }
	tests := []struct {
		name      string
		file      string // the token file's content; "" for none
		wantToken string
	}{
		{"no saved token", "", testToken},
		{"saved token of this user-data", hash(testToken) + " " + rotated + "\n", rotated},
		{"saved token of another instance's", hash("tok_other-instance") + " " + rotated + "\n", testToken},
		{"token file without a token", hash(testToken) + "\n", testToken},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if tt.file != "" {
				state := filepath.Join(dir, "var", "lib", "hangar")
				if err := os.MkdirAll(state, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(state, "bootstrap-token"), []byte(tt.file), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			envFile := filepath.Join(dir, "env.out")
			srv, fetches := bootstrapServer(t, tt.wantToken, envFile, 0, 0)
			path := filepath.Join(dir, "user-data")
			if err := os.WriteFile(path, mustRender(t, Params{Pool: "demo", HangarURL: srv.URL, BootstrapToken: testToken}), 0o700); err != nil {
				t.Fatal(err)
			}
			out, code := runUserData(t, dir, path, "HANGAR_USERDATA_FETCH_ATTEMPTS=1")
			if code != 0 || fetches.Load() != 1 {
				t.Fatalf("exit code %d after %d fetches; output:\n%s", code, fetches.Load(), out)
			}
			if got := readEnv(t, envFile)["HANGAR_BOOTSTRAP_TOKEN"]; got != tt.wantToken {
				t.Errorf("the bootstrap got token %q, want %q", got, tt.wantToken)
			}
			if said := strings.Contains(out, "using the bootstrap token saved by an earlier boot"); said != (tt.wantToken == rotated) {
				t.Errorf("output says it uses the saved token: %v; output:\n%s", said, out)
			}
			if strings.Contains(out, testToken) || strings.Contains(out, rotated) {
				t.Errorf("output shows a token:\n%s", out)
			}
		})
	}
}
