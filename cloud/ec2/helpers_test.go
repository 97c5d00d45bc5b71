package ec2

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
)

// hermetic keeps the SDK's default chains off the machine's own AWS
// setup: no instance metadata, no shared files, no AWS_* from the
// environment. Call it in a test that is not parallel, before its
// parallel subtests.
func hermetic(t testing.TB) {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	for _, k := range []string{
		"AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
		"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
		"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2",
		"AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CA_BUNDLE",
	} {
		t.Setenv(k, "")
	}
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func newServer(t testing.TB, opts ec2test.Options) *ec2test.Server {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	s := ec2test.New(opts)
	t.Cleanup(s.Close)
	return s
}

// observer records what Options.Observe reports.
type observer struct {
	mu    sync.Mutex
	calls map[string]int // action → requests
	codes map[string]int // action/code → requests
}

func newObserver() *observer {
	return &observer{calls: map[string]int{}, codes: map[string]int{}}
}

func (o *observer) observe(action, code string, d time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.calls[action]++
	if code != "" {
		o.codes[action+"/"+code]++
	}
}

func (o *observer) snapshot() (calls, codes map[string]int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return maps.Clone(o.calls), maps.Clone(o.codes)
}

// newProvider returns a provider on srv with static credentials. It
// refuses any endpoint but a loopback one, so no test can reach AWS.
func newProvider(t testing.TB, srv *ec2test.Server, edit func(*Options)) *Provider {
	t.Helper()
	opts := Options{
		Region:      "us-east-1",
		Endpoint:    srv.URL(),
		Credentials: credentials.NewStaticCredentialsProvider("AKIDEC2TEST", "ec2test-secret", ""),
		Logger:      testLogger(t),
	}
	if edit != nil {
		edit(&opts)
	}
	if !strings.HasPrefix(opts.Endpoint, "http://127.0.0.1:") {
		t.Fatalf("test endpoint %q is not the loopback test server", opts.Endpoint)
	}
	p, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// faultyTransport sits between the SDK and ec2test and loses answers:
// the request reaches the server (which acts on it) but the client gets a
// connection reset instead of the response, as when a network drops or a
// client times out. It is an HTTP fault, not a fake of the SDK.
type faultyTransport struct {
	next http.RoundTripper

	mu   sync.Mutex
	lose func(action string, n int) bool // n counts requests of action from 1
	seen map[string]int
	// reject answers requests whose body contains a key with an EC2 error
	// instead of sending them: a cloud that lacks a parameter.
	reject map[string]string // body substring → error code
	// rejectStatus is the HTTP status of those answers; 0 means 400.
	rejectStatus int
	// down, when it says so, answers the action with an HTML 500 instead
	// of sending it: a cloud that is down behind its web server.
	down func(action string) bool
	// bodies holds every request's body, in order.
	bodies []string
}

func newFaultyTransport() *faultyTransport {
	return &faultyTransport{next: http.DefaultTransport, seen: map[string]int{}, reject: map[string]string{}}
}

func (f *faultyTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		return nil, err
	}
	action := ""
	for kv := range strings.SplitSeq(string(body), "&") {
		if v, ok := strings.CutPrefix(kv, "Action="); ok {
			action = v
		}
	}
	f.mu.Lock()
	f.seen[action]++
	f.bodies = append(f.bodies, string(body))
	n := f.seen[action]
	if f.down != nil && f.down(action) {
		f.mu.Unlock()
		page := "<html><head><title>502 Bad Gateway</title></head><body><hr></body></html>"
		return &http.Response{
			StatusCode: http.StatusBadGateway, Status: "502 Bad Gateway", Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
			Header: http.Header{"Content-Type": {"text/html"}}, Body: io.NopCloser(strings.NewReader(page)),
			ContentLength: int64(len(page)), Request: r,
		}, nil
	}
	lose := f.lose != nil && f.lose(action, n)
	var code string
	for sub, c := range f.reject {
		if strings.Contains(string(body), sub) {
			code = c
		}
	}
	status := cmp.Or(f.rejectStatus, http.StatusBadRequest)
	f.mu.Unlock()
	if code != "" {
		msg := `<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>` + code +
			`</Code><Message>The parameter is not recognized</Message></Error></Errors><RequestID>fault-1</RequestID></Response>`
		return &http.Response{
			StatusCode: status, Status: http.StatusText(status), Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
			Header: http.Header{"Content-Type": {"text/xml"}}, Body: io.NopCloser(strings.NewReader(msg)),
			ContentLength: int64(len(msg)), Request: r,
		}, nil
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	resp, err := f.next.RoundTrip(r)
	if err != nil || !lose {
		return resp, err
	}
	// Read the answer the server sent, then lose it: the error is the loss.
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return nil, &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
}

// sent counts the requests of action whose body contains sub.
func (f *faultyTransport) sent(action, sub string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, b := range f.bodies {
		if strings.Contains(b, "Action="+action+"&") && strings.Contains(b, sub) {
			n++
		}
	}
	return n
}

func (f *faultyTransport) count(action string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seen[action]
}

// logLines keeps what a logger wrote, for tests that count log lines.
type logLines struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logLines) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(b)
}

// count returns how many lines contain sub.
func (l *logLines) count(sub string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.buf.String(), sub)
}

func (l *logLines) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// launchSpec is a minimal spec for ec2test's default image.
func launchSpec(token string, types ...string) cloud.LaunchSpec {
	if len(types) == 0 {
		types = []string{"t3.small"}
	}
	return cloud.LaunchSpec{
		Image:         ec2test.DefaultImageID,
		InstanceTypes: types,
		ClientToken:   token,
		Tags:          map[string]string{cloud.TagPool: "p", cloud.TagIntent: token},
	}
}

func instanceIDs(insts []cloud.Instance) []string {
	out := make([]string, len(insts))
	for i, in := range insts {
		out[i] = in.ID
	}
	return out
}

// serverInstance returns what ec2test holds for id.
func serverInstance(t *testing.T, srv *ec2test.Server, id string) ec2test.Instance {
	t.Helper()
	for _, in := range srv.Instances() {
		if in.ID == id {
			return in
		}
	}
	t.Fatalf("ec2test has no instance %s", id)
	return ec2test.Instance{}
}

func wantErrIs(t *testing.T, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error %v, want one matching %v", err, target)
	}
}
