package pool

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
)

// TestTokenRotatesAtRelease: the bootstrap token a build could read dies
// with its lease. The released answer to a bootstrap that takes rotated
// tokens brings a new one; the old one is refused from then on, also after
// a restart. Before, a build could keep the token and long-poll for the
// next lease's worker password.
func TestTokenRotatesAtRelease(t *testing.T) {
	h := newHarness(t, nil)
	id := h.warm(1)[0]
	ctx := context.Background()
	key := h.key(id)
	userDataToken, err := h.cloud.BootstrapToken(id)
	if err != nil {
		t.Fatal(err)
	}
	// use is a call the bootstrap makes with token: it returns the
	// instance's key, or fails.
	use := func(token string) (string, error) { return h.m.Authenticate(bootstrap.HashToken(token)) }
	poll := func(token string, p bootstrap.Poll) bootstrap.Assignment {
		t.Helper()
		k, err := use(token)
		if err != nil {
			t.Fatalf("polling: %v", err)
		}
		p.Rotate, p.TokenHash = true, bootstrap.HashToken(token)
		a, err := h.m.Assignment(ctx, k, p)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}

	// The first poll of a bootstrap that takes rotated tokens replaces the
	// user-data's token (readable on the instance through the metadata
	// service) before any build runs there, and answers at once.
	first := poll(userDataToken, bootstrap.Poll{Wait: time.Hour})
	if first.State != bootstrap.AssignNone || first.NewToken == "" {
		t.Fatalf("first poll: %s, new token %v; want none with a new token", first.State, first.NewToken != "")
	}
	// Both work until the new one is used; then only the new one.
	if k, err := use(first.NewToken); err != nil || k != key {
		t.Fatalf("the new token: %q, %v", k, err)
	}
	if _, err := use(userDataToken); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("the user-data's token after the new one was used: %v", err)
	}
	leaseToken := first.NewToken

	v := h.lease(LeaseRequest{})
	if a := poll(leaseToken, bootstrap.Poll{}); a.State != bootstrap.AssignAssigned || a.NewToken != "" {
		t.Fatalf("assigned answer: %s, new token %v; want assigned, no new token", a.State, a.NewToken != "")
	}
	h.release(v.ID, false)
	a := poll(leaseToken, bootstrap.Poll{Current: v.ID})
	if a.State != bootstrap.AssignReleased || a.NewToken == "" {
		t.Fatalf("released answer: %s, new token %v; want released with a new token", a.State, a.NewToken != "")
	}
	if got := poll(a.NewToken, bootstrap.Poll{}); got.State != bootstrap.AssignNone || got.NewToken != "" || h.state(id) != Idle {
		t.Fatalf("clean poll with the new token: %s (new token %v), instance %s; want none, idle", got.State, got.NewToken != "", h.state(id))
	}
	if _, err := use(leaseToken); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("the token the lease's build could read still works: %v", err)
	}
	h.restart()
	if _, err := use(leaseToken); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("old token after a restart: %v", err)
	}
	if k, err := use(a.NewToken); err != nil || k != key {
		t.Fatalf("new token after a restart: %q, %v", k, err)
	}
	// The next lease goes to the instance through the new token.
	next := h.lease(LeaseRequest{})
	if got := poll(a.NewToken, bootstrap.Poll{}); got.State != bootstrap.AssignAssigned || got.LeaseID != next.ID || got.NewToken != "" {
		t.Fatalf("next lease's assignment: %s %s", got.State, got.LeaseID)
	}
}

// TestRotatedTokenLostOnTheWay: an answer carrying a new token that never
// reached the instance (a crash cut it) does not lock the instance out: its
// next poll, with the old token, gets another new token, and the one that
// was lost dies.
func TestRotatedTokenLostOnTheWay(t *testing.T) {
	h := newHarness(t, nil)
	id := h.warm(1)[0]
	ctx := context.Background()
	old, _ := h.cloud.BootstrapToken(id)
	key := h.key(id)
	p := bootstrap.Poll{Rotate: true, TokenHash: bootstrap.HashToken(old)}
	lost, _ := h.m.Assignment(ctx, key, p)
	if lost.NewToken == "" {
		t.Fatal("no new token at the first poll")
	}
	h.restart() // the answer never arrived
	if _, err := h.m.Authenticate(bootstrap.HashToken(old)); err != nil {
		t.Fatalf("the old token after a lost answer: %v; the instance is locked out", err)
	}
	again, _ := h.m.Assignment(ctx, key, p)
	if again.NewToken == "" || again.NewToken == lost.NewToken {
		t.Fatal("a poll with the old token after a lost answer got no fresh token")
	}
	if _, err := h.m.Authenticate(bootstrap.HashToken(lost.NewToken)); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("the lost token still works: %v", err)
	}
	if k, err := h.m.Authenticate(bootstrap.HashToken(again.NewToken)); err != nil || k != key {
		t.Fatalf("the second new token: %q, %v", k, err)
	}
	if _, err := h.m.Authenticate(bootstrap.HashToken(old)); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("the old token once the new one is used: %v", err)
	}
}

// A bootstrap that does not say rotate=1 (a custom script written before
// rotation) keeps its token: rotating it would lock the instance out.
func TestTokenKeptForBootstrapsThatDoNotRotate(t *testing.T) {
	h := newHarness(t, nil)
	id := h.warm(1)[0]
	v := h.lease(LeaseRequest{})
	h.release(v.ID, false)
	if a := h.cleanRelease(id, v.ID); a.NewToken != "" {
		t.Fatal("a new token for a bootstrap that cannot take it")
	}
	if _, err := h.authenticate(id); err != nil {
		t.Fatalf("token after release: %v", err)
	}
}
