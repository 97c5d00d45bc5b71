package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
)

// serverTOML is testTOML with lines added to its [server] table.
func serverTOML(t *testing.T, serverLines string) string {
	return replaceOnce(testTOML(t.TempDir(), "demo", ""), `listen = "127.0.0.1:0"`, `listen = "127.0.0.1:0"`+"\n"+serverLines)
}

// With tls_cert and tls_key, serve answers HTTPS with that certificate,
// and the public URL instances get is https://.
func TestServeTLS(t *testing.T) {
	certFile, keyFile, roots := testutil.SelfSignedCert(t, t.TempDir(), "hangar")
	ts := startTest(t, serverTOML(t, fmt.Sprintf("tls_cert = %q\ntls_key = %q", certFile, keyFile)), nil)
	if !strings.HasPrefix(ts.url, "https://127.0.0.1:") {
		t.Fatalf("server url %s, want https://127.0.0.1:…", ts.url)
	}
	if ts.cfg.Server.PublicURL != ts.url {
		t.Errorf("public_url %s, want %s", ts.cfg.Server.PublicURL, ts.url)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	defer client.CloseIdleConnections()
	for _, path := range []string{"/healthz", "/v1/pools"} {
		resp, err := client.Get(ts.url + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		_, err = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if err != nil {
			t.Errorf("GET %s: reading the body: %v", path, err)
		}
		if resp.StatusCode != 200 || resp.TLS == nil {
			t.Errorf("GET %s: %d, TLS %v", path, resp.StatusCode, resp.TLS != nil)
		}
	}
	// It really is that certificate: a client that does not trust it fails.
	if resp, err := http.Get(ts.url + "/healthz"); err == nil {
		_ = resp.Body.Close()
		t.Error("a client without the test root trusted the server")
	}
	// And nothing answers in clear.
	plain := "http://" + strings.TrimPrefix(ts.url, "https://")
	if resp, err := http.Get(plain + "/v1/pools"); err == nil {
		b, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Errorf("plain http answered 200: %s", b)
		}
	}
}

// /metrics takes a token of any role once there are tokens, unless
// metrics_public.
func TestMetricsNeedToken(t *testing.T) {
	const leaseTok, adminTok = "metrics-lease-0123456789", "metrics-admin-0123456789"
	tokens := fmt.Sprintf(`
[[server.tokens]]
name = "ci"
role = "lease"
token = %q
[[server.tokens]]
name = "ops"
role = "admin"
token = %q
`, leaseTok, adminTok)
	get := func(t *testing.T, url, token string) int {
		t.Helper()
		req, _ := http.NewRequest("GET", url+"/metrics", nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode == 200 && !strings.Contains(string(b), "hangar_leases_active") {
			t.Errorf("/metrics answered 200 without metrics: %.200s", b)
		}
		return resp.StatusCode
	}
	ts := startTest(t, testTOML(t.TempDir(), "demo", "")+tokens, nil)
	for _, c := range []struct {
		name, token string
		status      int
	}{
		{"no token", "", 401},
		{"wrong token", "metrics-lease-0123456788", 401},
		{"lease token", leaseTok, 200},
		{"admin token", adminTok, 200},
	} {
		if got := get(t, ts.url, c.token); got != c.status {
			t.Errorf("%s: /metrics = %d, want %d", c.name, got, c.status)
		}
	}
	public := startTest(t, serverTOML(t, "metrics_public = true")+tokens, nil)
	if got := get(t, public.url, ""); got != 200 {
		t.Errorf("metrics_public: /metrics without a token = %d, want 200", got)
	}
	if got, _ := call(t, public.url, "GET", "/v1/pools", "", ""); got != 401 {
		t.Errorf("metrics_public: /v1/pools without a token = %d, want 401", got)
	}
}

// The HTTP server's limits: long polls fit under the write timeout, a
// client that sends its header or its body too slowly is cut off, and a
// huge header is refused; a normal request still works.
func TestServeTimeouts(t *testing.T) {
	ts := startTestWith(t, testTOML(t.TempDir(), "demo", ""), serveOptions{ReadHeaderTimeout: 300 * time.Millisecond, ReadTimeout: time.Second})
	h := ts.http
	if h.WriteTimeout <= pool.MaxWait || h.WriteTimeout <= bootstrap.MaxWait || h.MaxHeaderBytes != 64<<10 {
		t.Errorf("write timeout %s (long polls: %s, %s), max header bytes %d", h.WriteTimeout, pool.MaxWait, bootstrap.MaxWait, h.MaxHeaderBytes)
	}
	if d := startTestWith(t, testTOML(t.TempDir(), "demo", ""), serveOptions{}).http; d.ReadTimeout <= 0 || d.ReadHeaderTimeout <= 0 {
		t.Errorf("default read timeout %s, read header timeout %s", d.ReadTimeout, d.ReadHeaderTimeout)
	}
	addr := strings.TrimPrefix(ts.url, "http://")

	if status, _ := call(t, ts.url, "GET", "/v1/pools", "", ""); status != 200 {
		t.Errorf("GET /v1/pools = %d", status)
	}

	// cut sends first, then a byte of drip every 100ms; it returns how long
	// the server took to answer or close, or fails after 10s.
	cut := func(t *testing.T, first, drip string) (time.Duration, string) {
		t.Helper()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = conn.Close() }()
		start := time.Now()
		got := make(chan string, 1)
		go func() {
			b, _ := io.ReadAll(conn) // until the server closes
			got <- string(b)
		}()
		if _, err := io.WriteString(conn, first); err != nil {
			t.Fatal(err)
		}
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case answer := <-got:
				return time.Since(start), answer
			case <-tick.C:
				if time.Since(start) > 10*time.Second {
					t.Fatalf("the server still reads after %s", time.Since(start))
				}
				_, _ = conn.Write([]byte{drip[i%len(drip)]}) // fails once the server is gone
			}
		}
	}
	t.Run("slow header", func(t *testing.T) {
		d, _ := cut(t, "GET /v1/pools HTTP/1.1\r\nHost: x\r\n", "X-Slow: y\r\n")
		if d < 250*time.Millisecond || d > 5*time.Second {
			t.Errorf("a slow header was cut after %s, want about 300ms", d)
		}
	})
	t.Run("slow body", func(t *testing.T) {
		d, answer := cut(t, "POST /v1/leases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{", " ")
		if d < 900*time.Millisecond || d > 5*time.Second {
			t.Errorf("a slow body was cut after %s, want about 1s", d)
		}
		if answer != "" && !strings.HasPrefix(answer, "HTTP/1.1 400") {
			t.Errorf("a slow body got %.100q", answer)
		}
	})
	t.Run("huge header", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = conn.Close() }()
		if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		// The server answers before it has read it all: the write may fail.
		go func() {
			_, _ = fmt.Fprintf(conn, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n", strings.Repeat("a", 128<<10))
		}()
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("a 128 KiB header got %d", resp.StatusCode)
		}
	})
}

// The read timeout cuts requests, not a run's output upload, which lasts
// as long as its command, silences included; nor the long polls of
// `hangar run`.
func TestOutputOutlivesReadTimeout(t *testing.T) {
	ts := startTestWith(t, testTOML(t.TempDir(), "demo", ""), serveOptions{ReadTimeout: 500 * time.Millisecond})
	code, stdout, stderr := runCLI(t, "--server="+ts.url, "run", "-q", "demo", "--", "sh", "-c", "echo before; sleep 2; echo after")
	if code != 0 || stdout != "before\nafter\n" {
		t.Errorf("exit %d, stdout %q (want the output whole, without a break-off marker), stderr %q", code, stdout, stderr)
	}
	if strings.Contains(ts.logs.String(), "upload broke off") {
		t.Error("the output upload broke off")
	}
}

// serve refuses to start on a TLS key pair that does not load.
func TestServeRefusesBadTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, _, _ := testutil.SelfSignedCert(t, dir, "hangar")
	other := filepath.Join(dir, "other")
	if err := os.Mkdir(other, 0o700); err != nil {
		t.Fatal(err)
	}
	_, keyFile, _ := testutil.SelfSignedCert(t, other, "hangar")
	path := filepath.Join(dir, "hangar.toml")
	writeFile(t, path, serverTOML(t, fmt.Sprintf("tls_cert = %q\ntls_key = %q", certFile, keyFile)))
	code, _, stderr := runServe(t, path)
	if want := path + ":4: server.tls_cert: does not load with tls_key as a key pair: tls: private key does not match public key"; code == 0 || !strings.Contains(stderr, want) {
		t.Errorf("serve: exit %d, stderr %q; want %q", code, stderr, want)
	}
}
