package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// runServe runs `hangar serve --config path`, which is to refuse the
// config: it fails the test if serve is still serving after a minute.
func runServe(t *testing.T, path string) (code int, stdout, stderr string) {
	t.Helper()
	type result struct {
		code           int
		stdout, stderr string
	}
	done := make(chan result, 1)
	go func() {
		var out, errOut strings.Builder
		code := run([]string{"serve", "--config", path}, &out, &errOut)
		done <- result{code, out.String(), errOut.String()}
	}()
	select {
	case r := <-done:
		return r.code, r.stdout, r.stderr
	case <-time.After(time.Minute):
		t.Fatalf("serve accepted %s and serves", path)
		return 0, "", ""
	}
}

// lineOf is the line of text that holds s, counting from 1.
func lineOf(t *testing.T, text, s string) int {
	t.Helper()
	i := strings.Index(text, s)
	if i < 0 {
		t.Fatalf("%q is not in the config", s)
	}
	return strings.Count(text[:i], "\n") + 1
}

// `hangar config check` reports, at its line, whatever `hangar serve`
// refuses, and serve refuses it with the same words; no secret shows.
func TestConfigCheckAgreesWithServe(t *testing.T) {
	const dupSecret, shortSecret = "dup-secret-0123456789", "short-secret"
	t.Setenv("HANGAR_TEST_DUP_TOKEN", dupSecret)
	t.Setenv("HANGAR_TEST_UNSET_TOKEN", "")
	token := func(name, source string) string {
		return fmt.Sprintf("[[server.tokens]]\nname = %q\nrole = \"lease\"\n%s\n", name, source)
	}
	inClear := "http:// to a non-loopback host would send bootstrap tokens and worker passwords across the network in clear"
	cases := []struct {
		name    string
		text    string
		marker  string // where the problem is
		key     string
		problem string
		offline bool // --offline accepts it
	}{{
		name:    "two tokens with one secret",
		text:    testTOML(t.TempDir(), "demo", "") + token("a", "token = \""+dupSecret+"\"") + token("b", `token_env = "HANGAR_TEST_DUP_TOKEN"`),
		marker:  `token_env = "HANGAR_TEST_DUP_TOKEN"`,
		key:     "server.tokens[1].token_env",
		problem: "the same secret as server.tokens[0]: every token needs a secret of its own",
	}, {
		name:    "a short secret",
		text:    testTOML(t.TempDir(), "demo", "") + token("a", "token = \""+shortSecret+"\""),
		marker:  shortSecret,
		key:     "server.tokens[0].token",
		problem: "the secret is shorter than 16 bytes",
	}, {
		name:    "a secret not there",
		text:    testTOML(t.TempDir(), "demo", "") + token("a", `token_env = "HANGAR_TEST_UNSET_TOKEN"`),
		marker:  "HANGAR_TEST_UNSET_TOKEN",
		key:     "server.tokens[0].token_env",
		problem: "environment variable HANGAR_TEST_UNSET_TOKEN is not set or empty",
		offline: true,
	}, {
		name:    "an env name that changes how bash runs",
		text:    testTOML(t.TempDir(), "demo", "[pools.demo.env]\nBASH_ENV = \"/tmp/x\"\n"),
		marker:  "BASH_ENV =",
		key:     "pools.demo.env.BASH_ENV",
		problem: `invalid env name "BASH_ENV": it changes how the bootstrap script runs`,
	}, {
		name:    "an env value with a NUL byte",
		text:    testTOML(t.TempDir(), "demo", "[pools.demo.env]\nSECRETISH = \"a\\u0000b\"\n"),
		marker:  "SECRETISH =",
		key:     "pools.demo.env.SECRETISH",
		problem: "the value holds a NUL byte, which no environment can hold",
	}, {
		name:    "http to another host",
		text:    serverTOML(t, `public_url = "http://10.0.0.10:7878"`),
		marker:  "public_url",
		key:     "server.public_url",
		problem: inClear,
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "hangar.toml")
			writeFile(t, path, c.text)
			want := fmt.Sprintf("%s:%d: %s: %s", path, lineOf(t, c.text, c.marker), c.key, c.problem)
			noSecret := func(what, s string) {
				if strings.Contains(s, dupSecret) || strings.Contains(s, shortSecret) {
					t.Errorf("%s shows a secret: %s", what, s)
				}
			}

			code, out, errOut := runCLI(t, "config", "check", path)
			if code == 0 || !strings.Contains(errOut, want) {
				t.Errorf("config check: exit %d, stdout %q, stderr:\n%s\nwant:\n%s", code, out, errOut, want)
			}
			noSecret("config check", errOut)

			code, _, errOut = runServe(t, path)
			if code == 0 || !strings.Contains(errOut, want) {
				t.Errorf("serve: exit %d, stderr:\n%s\nwant:\n%s", code, errOut, want)
			}
			noSecret("serve", errOut)

			code, _, errOut = runCLI(t, "config", "check", "--offline", path)
			if c.offline != (code == 0) {
				t.Errorf("config check --offline: exit %d, stderr %q", code, errOut)
			}
		})
	}

	path := filepath.Join(t.TempDir(), "hangar.toml")
	writeFile(t, path, testTOML(t.TempDir(), "demo", "")+token("a", "token = \""+dupSecret+"\""))
	if code, out, errOut := runCLI(t, "config", "check", path); code != 0 || out != path+": ok (1 providers, 1 pools)\n" {
		t.Errorf("config check of a good config: exit %d, %q, %q", code, out, errOut)
	}
}
