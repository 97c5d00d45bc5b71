package local

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/hangar-ci/hangar/internal/testutil"
)

// lockedBuffer collects a provider's logs while its goroutines write them.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// recordingLogger logs at info and above to t and to the returned buffer.
func recordingLogger(t *testing.T) (*slog.Logger, *lockedBuffer) {
	var b lockedBuffer
	return slog.New(slog.NewTextHandler(io.MultiWriter(&b, t.Output()), &slog.HandlerOptions{Level: slog.LevelInfo})), &b
}

func savedMetadataAddr(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "metadata.addr"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// metadataReader is user-data that, each time the test creates the file
// named go<N> on its disk, reads its instance id and user-data through the
// URL it was booted with, and prints them as round N.
const metadataReader = `#!/bin/bash
# user-data of the shared metadata test
set -u
md=$HANGAR_METADATA_URL/latest
echo "url=$HANGAR_METADATA_URL"
for round in 1 2; do
	while [ ! -e go$round ]; do sleep 0.02; done
	token=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$md/api/token")
	echo "$round id=$(curl -sf -H "X-aws-ec2-metadata-token: $token" "$md/meta-data/instance-id")"
	if curl -sf -H "X-aws-ec2-metadata-token: $token" "$md/user-data" | grep -qx '# user-data of the shared metadata test'; then
		echo "$round user-data=ok"
	fi
	echo "$round done"
done
`

// readRound lets the instance read its metadata (round n) and checks what it got.
func readRound(t *testing.T, p *Provider, id, round string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(p.store.instanceDir(id), "disk", "go"+round), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	out := waitConsole(t, p, id, round+" done\n")
	for _, want := range []string{round + " id=" + id + "\n", round + " user-data=ok\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("round %s: console of %s lacks %q:\n%s", round, id, want, out)
		}
	}
}

// Two processes on one directory (here two Providers) share one metadata
// service: the second neither moves it nor listens, its instances are
// answered by the first, and when the first closes the second takes the
// service over on the same port, for the instances of both.
func TestMetadataServiceShared(t *testing.T) {
	testutil.NeedTool(t, "curl", "instances read their metadata with it")
	dir := t.TempDir()
	owner := newTestProvider(t, Options{Dir: dir})
	saved := savedMetadataAddr(t, dir)
	a := launchOne(t, owner, metadataReader)

	log, logs := recordingLogger(t)
	sharer := newTestProvider(t, Options{Dir: dir, Logger: log})
	base := owner.MetadataURL()
	if got := sharer.MetadataURL(); got != base {
		t.Errorf("second provider's metadata URL = %s, want the first's, %s", got, base)
	}
	if sharer.ownsMetadata() {
		t.Error("second provider listens for the metadata service")
	}
	if got := savedMetadataAddr(t, dir); got != saved {
		t.Errorf("metadata.addr = %s after the second provider opened, want %s", got, saved)
	}
	b := launchOne(t, sharer, metadataReader)
	for _, in := range []string{a.ID, b.ID} {
		waitConsole(t, owner, in, "url="+base+"/")
		readRound(t, owner, in, "1")
	}

	if err := owner.Close(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the second provider to take the metadata service over", waitFor, sharer.ownsMetadata)
	if got := sharer.MetadataURL(); got != base {
		t.Errorf("metadata URL after the take-over = %s, want %s", got, base)
	}
	if got := savedMetadataAddr(t, dir); got != saved {
		t.Errorf("metadata.addr = %s after the take-over, want %s", got, saved)
	}
	for _, in := range []string{a.ID, b.ID} {
		readRound(t, sharer, in, "2")
	}
	if strings.Contains(logs.String(), "moved") {
		t.Errorf("the second provider moved the metadata service:\n%s", logs)
	}

	// A process started now shares the service of the one that took it over.
	third := newTestProvider(t, Options{Dir: dir})
	if third.ownsMetadata() || third.MetadataURL() != base {
		t.Errorf("third provider: listens %v, URL %s; want it to share %s", third.ownsMetadata(), third.MetadataURL(), base)
	}
}

// What holds the saved port is trusted only if it proves to be this
// directory's metadata service at that very address; otherwise the service
// moves to a new port, as it did before there was sharing.
func TestMetadataServiceStrangerOnSavedPort(t *testing.T) {
	tests := []struct {
		name string
		// stranger starts what holds the saved port and returns its
		// address; real is the URL of this directory's service.
		stranger func(t *testing.T, real string) string
	}{
		{"answers everything", func(t *testing.T, real string) string {
			return serveStranger(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.WriteString(w, strings.Repeat("0", 64))
			}))
		}},
		{"relays to this directory's service", func(t *testing.T, real string) string {
			u, err := url.Parse(real)
			if err != nil {
				t.Fatal(err)
			}
			return serveStranger(t, httputil.NewSingleHostReverseProxy(u))
		}},
		{"is another directory's service", func(t *testing.T, real string) string {
			return strings.TrimPrefix(newTestProvider(t, Options{}).MetadataURL(), "http://")
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			first := newTestProvider(t, Options{Dir: dir})
			strange := tc.stranger(t, first.MetadataURL())
			if err := writeFile(filepath.Join(dir, "metadata.addr"), []byte(strange+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}

			log, logs := recordingLogger(t)
			p := newTestProvider(t, Options{Dir: dir, Logger: log})
			if !p.ownsMetadata() || p.MetadataURL() == "http://"+strange {
				t.Errorf("provider listens %v, URL %s; want it to listen anew, away from the stranger at %s", p.ownsMetadata(), p.MetadataURL(), strange)
			}
			if got := savedMetadataAddr(t, dir); "http://"+got != p.MetadataURL() {
				t.Errorf("metadata.addr = %s, want the new address of %s", got, p.MetadataURL())
			}
			if !strings.Contains(logs.String(), "metadata service moved to a new port") {
				t.Errorf("no warning that the service moved:\n%s", logs)
			}

			// A fixed address held by a stranger is an error, not a move.
			q, err := New(t.Context(), Options{Dir: dir, MetadataAddr: strange})
			if err == nil {
				_ = q.Close()
			}
			if err == nil || !strings.Contains(err.Error(), "not this directory's metadata service") {
				t.Errorf("New on a fixed address held by a stranger: %v, want a refusal", err)
			}
		})
	}
}

// serveStranger serves h on a new loopback port until the test ends.
func serveStranger(t *testing.T, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}
