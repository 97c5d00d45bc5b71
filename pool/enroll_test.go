package pool

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/identity"
	"github.com/hangar-ci/hangar/metrics"
	"github.com/hangar-ci/hangar/pool/store"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// lockedBuffer is a log both the Manager and the test use.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// batchHash is the hash of the batch token in instance id's user-data.
func (h *harness) batchHash(id string) string {
	h.t.Helper()
	tok, err := h.cloud.BootstrapToken(id)
	if err != nil {
		h.t.Fatal(err)
	}
	return bootstrap.HashToken(tok)
}

// enrollAs enrolls instance id with the batch token of from's user-data.
func (h *harness) enrollAs(from, id, key string) (string, error) {
	return h.m.Enroll(context.Background(), h.batchHash(from), bootstrap.Enrollment{InstanceID: id, EnrollKey: key, RemoteAddr: "127.0.0.1:9"})
}

// enroll is what an instance of a batch does at boot: it enrolls with its
// user-data's batch token and its own id.
func (h *harness) enroll(id, key string) (string, error) { return h.enrollAs(id, id, key) }

// enrolledReady enrolls id and reports it ready with the token it got.
func (h *harness) enrolledReady(id string) {
	h.t.Helper()
	tok, err := h.enroll(id, "key-"+id)
	if err != nil {
		h.t.Fatalf("enrolling %s: %v", id, err)
	}
	key, err := h.m.Authenticate(bootstrap.HashToken(tok))
	if err != nil {
		h.t.Fatalf("%s authenticating with its enrolled token: %v", id, err)
	}
	if err := h.m.Ready(context.Background(), key, bootstrap.Ready{}); err != nil {
		h.t.Fatalf("ready %s: %v", id, err)
	}
	h.settle()
}

// Every refusal: 401, a log line naming the instance and why, the metric,
// and no token issued.
func TestEnrollRefusals(t *testing.T) {
	for _, tc := range []struct {
		name   string
		reason string
		// do makes the refused enrollment; a and b are the two batches'
		// instances.
		do func(h *harness, a, b []string) (string, error)
		id func(a, b []string) string
	}{{
		name: "id of another batch", reason: "other_batch",
		do: func(h *harness, a, b []string) (string, error) { return h.enrollAs(a[0], b[0], "k") },
		id: func(a, b []string) string { return b[0] },
	}, {
		name: "unknown id", reason: "unknown_id",
		do: func(h *harness, a, b []string) (string, error) { return h.enrollAs(a[0], "i-ffffffff", "k") },
		id: func(a, b []string) string { return "i-ffffffff" },
	}, {
		name: "reused id, token used", reason: "reused_id",
		do: func(h *harness, a, b []string) (string, error) {
			tok, err := h.enroll(a[0], "k")
			if err != nil {
				h.t.Fatal(err)
			}
			if _, err := h.m.Authenticate(bootstrap.HashToken(tok)); err != nil {
				h.t.Fatal(err)
			}
			return h.enroll(a[0], "k")
		},
		id: func(a, b []string) string { return a[0] },
	}, {
		name: "reused id, another key", reason: "reused_id",
		do: func(h *harness, a, b []string) (string, error) {
			if _, err := h.enroll(a[0], "k"); err != nil {
				h.t.Fatal(err)
			}
			return h.enroll(a[0], "other")
		},
		id: func(a, b []string) string { return a[0] },
	}, {
		name: "dead token: every slot enrolled", reason: "dead_token",
		do: func(h *harness, a, b []string) (string, error) {
			for _, id := range a {
				if _, err := h.enroll(id, "k"+id); err != nil {
					h.t.Fatal(err)
				}
			}
			return h.enroll(a[0], "k"+a[0])
		},
		id: func(a, b []string) string { return a[0] },
	}, {
		name: "past the deadline", reason: "dead_token",
		do: func(h *harness, a, b []string) (string, error) {
			h.clock.Advance(h.opts.Pools["demo"].BootTimeout + time.Second)
			return h.enroll(a[0], "k")
		},
		id: func(a, b []string) string { return a[0] },
	}, {
		name: "no enroll key", reason: "no_enroll_key",
		do: func(h *harness, a, b []string) (string, error) { return h.enroll(a[0], "") },
		id: func(a, b []string) string { return a[0] },
	}} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(s *Spec) { s.LaunchBatch = 2; s.MaxInstances = 4 })
			logs := &lockedBuffer{}
			h.logs, h.metrics = logs, metrics.New(prometheus.NewRegistry(), func() metrics.Snapshot { return metrics.Snapshot{} })
			h.restart()
			h.scaleTo(4)
			h.settle()
			calls := h.cloud.Calls("launch")
			if len(calls) != 2 {
				t.Fatalf("launch calls %+v, want 2 batches", calls)
			}
			a, b := calls[0].IDs, calls[1].IDs
			h.m.mu.Lock()
			tokensBefore := len(h.m.byToken)
			h.m.unlock()
			issuedBefore := 0
			if tc.reason == "reused_id" || tc.reason == "dead_token" && strings.HasPrefix(tc.name, "dead") {
				issuedBefore = -1 // the case issues tokens on its way
			}
			tok, err := tc.do(h, a, b)
			if !errors.Is(err, bootstrap.ErrUnauthorized) || tok != "" {
				t.Fatalf("enrollment: token %q, err %v; want refused", tok, err)
			}
			line := ""
			for l := range strings.Lines(logs.String()) {
				if strings.Contains(l, "enrollment refused") {
					line = l
				}
			}
			id := tc.id(a, b)
			if !strings.Contains(line, "instance="+id) || !strings.Contains(line, "reason="+tc.reason) || !strings.Contains(line, "batch=b-") {
				t.Errorf("log line %q, want one naming instance %s, its batch and reason %s", line, id, tc.reason)
			}
			if got := testutil.ToFloat64(h.metrics.Enrollments.WithLabelValues("demo", tc.reason)); got != 1 {
				t.Errorf("hangar_enrollments_total{result=%q} = %v, want 1", tc.reason, got)
			}
			if issuedBefore == 0 {
				h.m.mu.Lock()
				tokensAfter := len(h.m.byToken)
				h.m.unlock()
				if tokensAfter != tokensBefore {
					t.Errorf("bootstrap tokens %d → %d after a refusal, want none issued", tokensBefore, tokensAfter)
				}
			}
			if strings.Contains(logs.String(), tok) && tok != "" {
				t.Error("a token is in the log")
			}
		})
	}
}

// An instance that boots before its launch call has answered is told to
// ask again (ErrEnrollPending), and enrolls once the answer is in; its
// token then bootstraps it to serve a lease.
func TestEnrollBeforeLaunchAnswer(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 2; s.MaxInstances = 2 })
	entered, proceed := make(chan struct{}), make(chan struct{})
	h.cloud.SetAfterLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		close(entered)
		<-proceed
		return nil
	})
	v := h.pendingLease(LeaseRequest{Wait: 10 * time.Minute})
	<-entered
	ids := h.cloud.Running()
	if len(ids) != 1 {
		t.Fatalf("cloud runs %v, want the lease's instance", ids)
	}
	if _, err := h.enroll(ids[0], "k"); !errors.Is(err, bootstrap.ErrEnrollPending) {
		t.Fatalf("enrolling before the launch answered: %v, want ErrEnrollPending", err)
	}
	h.cloud.SetAfterLaunch(nil)
	close(proceed)
	h.settle()
	h.enrolledReady(ids[0])
	if got := h.getLease(v.ID); got.State != LeaseActive || got.Instance == nil || got.Instance.ID != ids[0] {
		t.Fatalf("lease %+v, want active on %s", got, ids[0])
	}
}

// An enrollment whose answer was lost is answered again, with a new token,
// for the same key only, and only until the token is used; the earlier
// token dies.
func TestEnrollLostAnswerSameKey(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 2; s.MaxInstances = 2 })
	h.scaleTo(2)
	h.settle()
	id := h.ids(Booting)[0]
	first, err := h.enroll(id, "k")
	if err != nil {
		t.Fatal(err)
	}
	second, err := h.enroll(id, "k")
	if err != nil || second == first {
		t.Fatalf("enrolling again with the same key: %v (same token %v), want a new token", err, second == first)
	}
	if _, err := h.m.Authenticate(bootstrap.HashToken(first)); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Errorf("the token of the lost answer: %v, want refused", err)
	}
	if _, err := h.m.Authenticate(bootstrap.HashToken(second)); err != nil {
		t.Errorf("the token answered again: %v", err)
	}
	if _, err := h.enroll(id, "k"); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Errorf("enrolling once the token was used: %v, want refused", err)
	}
}

// The enrollment is on disk when answered: the store, read as it is while
// the Manager runs, already holds the slot enrolled with the token's hash
// (and never the token), so no crash can forget a token an instance has.
func TestEnrollDurableBeforeAnswer(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 2; s.MaxInstances = 2 })
	h.scaleTo(2)
	h.settle()
	id := h.ids(Booting)[0]
	key := h.instance(id).Key
	tok, err := h.enroll(id, "k")
	if err != nil {
		t.Fatal(err)
	}
	insts, err := store.Load[*Instance](h.store, store.Instances)
	if err != nil {
		t.Fatal(err)
	}
	in := insts[key]
	if in == nil || in.EnrolledAt.IsZero() || in.TokenHash != bootstrap.HashToken(tok) || in.EnrollKeyHash != bootstrap.HashToken("k") {
		t.Fatalf("slot on disk when the enrollment was answered: %+v; want it enrolled with the token's hash", in)
	}
	h.restart()
	if _, err = h.m.Authenticate(bootstrap.HashToken(tok)); err != nil {
		t.Fatalf("enrolled token after a restart: %v", err)
	}
}

// The batch token dies once every slot has enrolled: it opens nothing.
func TestBatchTokenDiesWhenAllEnrolled(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 3; s.MaxInstances = 3 })
	h.scaleTo(3)
	h.settle()
	ids := h.ids(Booting)
	hash := h.batchHash(ids[0])
	for i, id := range ids {
		if _, err := h.m.AuthenticateBatch(hash); err != nil {
			t.Fatalf("batch token before enrollment %d: %v", i, err)
		}
		h.enrolledReady(id)
	}
	if _, err := h.m.AuthenticateBatch(hash); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("batch token after every slot enrolled: %v, want refused", err)
	}
	h.restart()
	if _, err := h.m.AuthenticateBatch(hash); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("batch token after a restart: %v, want still refused", err)
	}
	if got := h.ids(Idle); len(got) != 3 {
		t.Errorf("idle %v, want all 3", got)
	}
}

// A slot that never enrolls: the batch token dies at boot_timeout, the
// straggler is ended for its boot timeout and replaced, the others serve.
func TestBatchTokenDiesAtBootTimeout(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 3; s.MaxInstances = 3 })
	h.scaleTo(3)
	h.settle()
	ids := h.ids(Booting)
	hash := h.batchHash(ids[0])
	h.enrolledReady(ids[0])
	h.enrolledReady(ids[1])
	straggler := ids[2]
	h.clock.Advance(h.opts.Pools["demo"].BootTimeout)
	h.tick()
	if _, err := h.m.AuthenticateBatch(hash); err != nil {
		t.Fatalf("batch token at exactly boot_timeout: %v, want valid", err)
	}
	h.clock.Advance(time.Second)
	h.tick()
	if _, err := h.m.AuthenticateBatch(hash); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("batch token past boot_timeout: %v, want refused", err)
	}
	if got := h.instance(straggler); got.State != Gone || got.Reason != ReasonBootTimeout || !h.cloud.Terminated(straggler) {
		t.Errorf("straggler %s: %s (%s), terminated %v; want gone for boot_timeout", straggler, got.State, got.Reason, h.cloud.Terminated(straggler))
	}
	if _, err := h.enroll(straggler, "late"); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Errorf("the straggler enrolling late: %v, want refused", err)
	}
	calls := h.cloud.Calls("launch")
	if len(calls) != 2 || calls[1].N != 1 || calls[1].ClientToken == calls[0].ClientToken {
		t.Fatalf("launch calls %+v, want a new batch of 1 replacing the straggler", calls)
	}
	replacement := calls[1].IDs[0]
	h.enrolledReady(replacement)
	if got := h.ids(Idle); len(got) != 3 {
		t.Errorf("idle %v, want the two that enrolled and the replacement", got)
	}
}

// With signed identity, an instance enrolls only with a document the
// cloud signed, of the provider's region and account, naming the instance
// itself, of a machine started for this batch.
func TestEnrollSignedIdentity(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := identity.SelfSigned(key, "test")
	if err != nil {
		t.Fatal(err)
	}
	v, err := identity.FromPEM(cert)
	if err != nil {
		t.Fatal(err)
	}
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	type doc struct {
		id, region, account string
		started             time.Duration // before the batch's intent
		signer              *rsa.PrivateKey
		none                bool
	}
	for _, tc := range []struct {
		name string
		doc  func(id string) doc
		ok   bool
	}{
		{name: "its own document", ok: true, doc: func(id string) doc { return doc{id: id, region: "r-1", account: "123"} }},
		{name: "no document", doc: func(id string) doc { return doc{none: true} }},
		{name: "another instance's", doc: func(id string) doc { return doc{id: "i-99999999", region: "r-1", account: "123"} }},
		{name: "another region's", doc: func(id string) doc { return doc{id: id, region: "r-2", account: "123"} }},
		{name: "another account's", doc: func(id string) doc { return doc{id: id, region: "r-1", account: "456"} }},
		{name: "signed by another key", doc: func(id string) doc { return doc{id: id, region: "r-1", account: "123", signer: other} }},
		{name: "an older machine's", doc: func(id string) doc { return doc{id: id, region: "r-1", account: "123", started: time.Hour} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(s *Spec) {
				s.LaunchBatch, s.MaxInstances, s.Identity = 1, 1, "signed"
				s.SignedIdentity = &IdentityCheck{Verifier: v, Region: "r-1", Account: "123"}
			})
			h.scaleTo(1)
			h.settle()
			id := h.only(Booting)
			if calls := h.cloud.Calls("launch"); len(calls) != 1 || !strings.HasPrefix(calls[0].ClientToken, "b-") {
				t.Fatalf("launch calls %+v, want one batch (signed identity always enrolls)", calls)
			}
			d := tc.doc(id)
			e := bootstrap.Enrollment{InstanceID: id, EnrollKey: "k"}
			if !d.none {
				signer := cmp.Or(d.signer, key)
				raw, err := identity.Document{InstanceID: d.id, Region: d.region, AccountID: d.account,
					PendingTime: h.clock.Now().Add(-d.started)}.Marshal()
				if err != nil {
					t.Fatal(err)
				}
				sig, err := identity.Sign(signer, raw)
				if err != nil {
					t.Fatal(err)
				}
				e.Document, e.Signature = raw, sig
			}
			tok, err := h.m.Enroll(context.Background(), h.batchHash(id), e)
			if tc.ok != (err == nil) || !tc.ok && !errors.Is(err, bootstrap.ErrUnauthorized) {
				t.Fatalf("enrollment: %v, want ok %v", err, tc.ok)
			}
			if tc.ok {
				if _, err := h.m.Authenticate(bootstrap.HashToken(tok)); err != nil {
					t.Errorf("enrolled token: %v", err)
				}
			}
		})
	}
}

// A batch's instance fetches its pool's bootstrap script with the batch
// token before it enrolls: AuthenticateBatch names the pool, PoolScript
// serves its script.
func TestBatchTokenFetchesScript(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 2; s.MaxInstances = 2 })
	h.scaleTo(2)
	h.settle()
	pool, err := h.m.AuthenticateBatch(h.batchHash(h.ids(Booting)[0]))
	if err != nil || pool != "demo" {
		t.Fatalf("AuthenticateBatch = %q, %v; want demo", pool, err)
	}
	script, err := h.m.PoolScript(context.Background(), pool)
	if err != nil || !bytes.Contains(script, []byte("/bootstrap/v1/enroll")) {
		t.Fatalf("PoolScript: %v, %d bytes; want generic.sh, which enrolls", err, len(script))
	}
	if _, err := h.m.PoolScript(context.Background(), "nope"); !errors.Is(err, ErrUnknownPool) {
		t.Errorf("PoolScript of an unknown pool: %v", err)
	}
}
