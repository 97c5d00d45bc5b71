package local

import (
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestMetadataService(t *testing.T) {
	var offset atomic.Int64 // lets the test move the provider's clock
	clock := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	p := newTestProviderClock(t, Options{}, clock)
	spec := launchSpec("#!/bin/bash\ntrue\n", nil)
	spec.InstanceTypes = []string{"t3.small", "t3a.small"}
	spec.Zones = []string{"eu-1b", "eu-1c"}
	spec.Image = "ami-0123"
	insts, err := p.Launch(t.Context(), spec, 2)
	if err != nil {
		t.Fatal(err)
	}
	key := func(id string) string {
		r, err := p.store.getRecord(id)
		if err != nil {
			t.Fatal(err)
		}
		return r.MetadataKey
	}
	a, b := insts[0], insts[1]
	base := p.MetadataURL() + "/" + key(a.ID) + "/latest"

	do := func(method, url string, header map[string]string) (int, string) {
		t.Helper()
		req, err := http.NewRequestWithContext(t.Context(), method, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range header {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	token := func(base string, ttl string) string {
		t.Helper()
		code, body := do("PUT", base+"/api/token", map[string]string{tokenTTLHeader: ttl})
		if code != 200 {
			t.Fatalf("PUT token: %d %s", code, body)
		}
		return body
	}
	tok := token(base, "2")
	bTok := token(p.MetadataURL()+"/"+key(b.ID)+"/latest", "60")
	auth := map[string]string{tokenHeader: tok}

	tests := []struct {
		name, method, url string
		header            map[string]string
		wantCode          int
		wantBody          string
	}{
		{"instance id", "GET", base + "/meta-data/instance-id", auth, 200, a.ID},
		{"local ipv4", "GET", base + "/meta-data/local-ipv4", auth, 200, a.PrivateIP},
		{"instance type", "GET", base + "/meta-data/instance-type", auth, 200, "t3.small"},
		{"zone", "GET", base + "/meta-data/placement/availability-zone", auth, 200, "eu-1b"},
		{"ami id", "GET", base + "/meta-data/ami-id", auth, 200, "ami-0123"},
		{"user-data", "GET", base + "/user-data", auth, 200, "#!/bin/bash\ntrue\n"},
		{"listing", "GET", base + "/meta-data/", auth, 200, "ami-id\ninstance-id\ninstance-type\nlocal-ipv4\nplacement/\n"},
		{"unknown path", "GET", base + "/meta-data/iam/info", auth, 404, ""},
		{"no token", "GET", base + "/meta-data/instance-id", nil, 401, ""},
		{"bad token", "GET", base + "/meta-data/instance-id", map[string]string{tokenHeader: "9999999999.AAAA"}, 401, ""},
		{"token of another instance", "GET", base + "/meta-data/instance-id", map[string]string{tokenHeader: bTok}, 401, ""},
		{"unknown key", "GET", p.MetadataURL() + "/" + strings.Repeat("0", 32) + "/latest/meta-data/instance-id", auth, 404, ""},
		{"no key", "GET", p.MetadataURL() + "/latest/meta-data/instance-id", auth, 404, ""},
		{"token without ttl", "PUT", base + "/api/token", nil, 400, ""},
		{"token with ttl 0", "PUT", base + "/api/token", map[string]string{tokenTTLHeader: "0"}, 400, ""},
		{"token with ttl too long", "PUT", base + "/api/token", map[string]string{tokenTTLHeader: "21601"}, 400, ""},
		{"token by GET", "GET", base + "/api/token", map[string]string{tokenTTLHeader: "60"}, 405, ""},
		{"proxied token", "PUT", base + "/api/token", map[string]string{tokenTTLHeader: "60", "X-Forwarded-For": "10.0.0.1"}, 403, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, body := do(tc.method, tc.url, tc.header)
			if code != tc.wantCode || tc.wantBody != "" && body != tc.wantBody {
				t.Errorf("%s %s = %d %q, want %d %q", tc.method, tc.url, code, body, tc.wantCode, tc.wantBody)
			}
		})
	}

	offset.Store(int64(3 * time.Second))
	if code, _ := do("GET", base+"/meta-data/instance-id", auth); code != 401 {
		t.Errorf("expired token: got %d, want 401", code)
	}

	// A token survives a restart of the server, which serves on the same
	// port; a terminated instance's key dies.
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	other := newTestProvider(t, Options{Dir: p.opts.Dir})
	if !other.ownsMetadata() || other.MetadataURL() != p.MetadataURL() {
		t.Errorf("restarted service: serves %v at %s, want it to serve at %s", other.ownsMetadata(), other.MetadataURL(), p.MetadataURL())
	}
	bBase := other.MetadataURL() + "/" + key(b.ID) + "/latest"
	if code, body := do("GET", bBase+"/meta-data/instance-id", map[string]string{tokenHeader: bTok}); code != 200 || body != b.ID {
		t.Errorf("token from another server run: %d %q", code, body)
	}
	if _, err := p.Terminate(t.Context(), []string{b.ID}); err != nil {
		t.Fatal(err)
	}
	if code, _ := do("GET", bBase+"/meta-data/instance-id", map[string]string{tokenHeader: bTok}); code != 404 {
		t.Errorf("metadata of a terminated instance: got %d, want 404", code)
	}
}
