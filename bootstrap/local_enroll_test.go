package bootstrap

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/identity"
	"github.com/hangar-ci/hangar/cloud/local"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/scripts"
	"github.com/hangar-ci/hangar/userdata"
)

// batchBackend is a pool of one batch, as far as its instances see it: the
// batch token opens the script, and an instance enrolls if its signed
// identity verifies and its id is one the launch returned (pending until
// the launch has answered), once.
type batchBackend struct {
	batch    string
	verifier *identity.Verifier
	region   string

	mu       sync.Mutex
	launched map[string]bool   // nil until the launch answered
	tokens   map[string]string // token hash → instance id
	enrolled map[string]int    // instance id → enrollments
	pending  int
	refused  []string
	ready    map[string]bool
}

func (b *batchBackend) Authenticate(hash string) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if id, ok := b.tokens[hash]; ok {
		return id, nil
	}
	return "", ErrUnauthorized
}

func (b *batchBackend) AuthenticateBatch(hash string) (string, error) {
	if hash == HashToken(b.batch) {
		return "p1", nil
	}
	return "", ErrUnauthorized
}

func (b *batchBackend) PoolScript(ctx context.Context, pool string) ([]byte, error) {
	return scripts.BootstrapScript("generic.sh")
}

func (b *batchBackend) Script(ctx context.Context, instance string) ([]byte, error) {
	return scripts.BootstrapScript("generic.sh")
}

func (b *batchBackend) Enroll(ctx context.Context, hash string, e Enrollment) (string, error) {
	doc, err := b.verifier.Verify(b.region, e.Document, e.Signature)
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case hash != HashToken(b.batch):
		return "", ErrUnauthorized
	case err != nil || doc.InstanceID != e.InstanceID:
		b.refused = append(b.refused, e.InstanceID+": identity")
		return "", ErrUnauthorized
	case b.launched == nil:
		b.pending++
		return "", ErrEnrollPending
	case !b.launched[e.InstanceID] || b.enrolled[e.InstanceID] > 0:
		b.refused = append(b.refused, e.InstanceID+": not of the batch, or enrolled")
		return "", ErrUnauthorized
	}
	raw := make([]byte, 24)
	_, _ = rand.Read(raw)
	token := hex.EncodeToString(raw)
	b.tokens[HashToken(token)] = e.InstanceID
	b.enrolled[e.InstanceID]++
	return token, nil
}

func (b *batchBackend) Ready(ctx context.Context, instance string, r Ready) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.ready[instance] = true
	return nil
}

func (b *batchBackend) Assignment(context.Context, string, Poll) (Assignment, error) {
	return Assignment{State: AssignTerminate}, nil
}

func (b *batchBackend) Heartbeat(context.Context, string, Heartbeat) error { return nil }

func (b *batchBackend) OpenOutput(context.Context, string, string, int) (io.Writer, error) {
	return nil, ErrNotCurrent
}

func (b *batchBackend) Exit(context.Context, string, string, int, int) error { return ErrNotCurrent }

// TestLocalBatchEnrolls runs the whole instance side of a batched launch on
// the local cloud: one user-data with the batch token for three instances,
// which fetch generic.sh with it, read their ids and signed identity from
// the local metadata service (asking again while the launch has not
// answered), enroll, and report ready each with its own token.
func TestLocalBatchEnrolls(t *testing.T) {
	testutil.NeedTool(t, "curl", "apt-get install curl")
	p, err := local.New(t.Context(), local.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	var insts []cloud.Instance
	t.Cleanup(func() {
		ids := make([]string, len(insts))
		for i, in := range insts {
			ids[i] = in.ID
		}
		if len(ids) > 0 {
			if _, err := p.Terminate(context.Background(), ids); err != nil {
				t.Errorf("Terminate: %v", err)
			}
		}
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	v, err := identity.FromPEM(p.IdentityCertificate())
	if err != nil {
		t.Fatal(err)
	}
	b := &batchBackend{batch: "batch-" + strings.Repeat("ab", 16), verifier: v, region: p.Region(),
		tokens: map[string]string{}, enrolled: map[string]int{}, ready: map[string]bool{}}
	var logs syncBuffer
	hangar := httptest.NewServer(Handler(b, slog.New(slog.NewTextHandler(&logs, nil))))
	defer hangar.Close()

	ud, err := userdata.Render(userdata.Params{Pool: "p1", HangarURL: hangar.URL, BootstrapToken: b.batch,
		Enroll: true, Identity: userdata.IdentitySigned})
	if err != nil {
		t.Fatal(err)
	}
	insts, err = p.Launch(t.Context(), cloud.LaunchSpec{Image: "local", UserData: ud, ClientToken: "batch-test"}, 3)
	if err != nil {
		t.Fatal(err)
	}
	// The instances boot at once; their enrollments wait for this answer.
	// A wait, not a sleep of the test: the first asks are answered 503.
	testutil.Eventually(t, "an enrollment before the launch answered", 30*time.Second, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.pending > 0
	})
	b.mu.Lock()
	b.launched = map[string]bool{}
	for _, in := range insts {
		b.launched[in.ID] = true
	}
	b.mu.Unlock()

	testutil.Eventually(t, "three instances ready", 60*time.Second, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.ready) == 3
	})
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, in := range insts {
		if in.LaunchIndex != i {
			t.Errorf("%s: launch index %d, want %d", in.ID, in.LaunchIndex, i)
		}
		if b.enrolled[in.ID] != 1 || !b.ready[in.ID] {
			t.Errorf("%s: enrolled %d times, ready %v; want once, ready", in.ID, b.enrolled[in.ID], b.ready[in.ID])
		}
	}
	if len(b.refused) > 0 {
		t.Errorf("refused: %v", b.refused)
	}
	if strings.Contains(logs.String(), b.batch) {
		t.Errorf("the log shows the batch token")
	}
	if t.Failed() {
		for _, in := range insts {
			out, err := p.ConsoleOutput(context.Background(), in.ID)
			t.Logf("console of %s (%v):\n%s", in.ID, err, out)
		}
	}
}
