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

	// The first poll of a bootstrap that takes rotated tokens replaces the
	// user-data's token (readable on the instance through the metadata
	// service) before any build runs there, and answers at once.
	first, err := h.m.Assignment(ctx, key, bootstrap.Poll{Rotate: true, Wait: time.Hour})
	if err != nil || first.State != bootstrap.AssignNone || first.NewToken == "" {
		t.Fatalf("first poll: %s, %v, new token %v; want none with a new token", first.State, err, first.NewToken != "")
	}
	if _, err := h.authenticate(id); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("the user-data's token still works after the first poll: %v", err)
	}
	leaseToken := first.NewToken

	v := h.lease(LeaseRequest{})
	if a, _ := h.m.Assignment(ctx, key, bootstrap.Poll{Rotate: true}); a.State != bootstrap.AssignAssigned || a.NewToken != "" {
		t.Fatalf("assigned answer: %s, new token %v; want assigned, no new token", a.State, a.NewToken != "")
	}
	h.release(v.ID, false)
	a, err := h.m.Assignment(ctx, key, bootstrap.Poll{Current: v.ID, Rotate: true})
	if err != nil || a.State != bootstrap.AssignReleased || a.NewToken == "" {
		t.Fatalf("released answer: %s, %v, new token %v; want released with a new token", a.State, err, a.NewToken != "")
	}
	if _, err := h.m.Authenticate(bootstrap.HashToken(leaseToken)); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("the token the lease's build could read still works: %v", err)
	}
	newKey, err := h.m.Authenticate(bootstrap.HashToken(a.NewToken))
	if err != nil || newKey != key {
		t.Fatalf("the new token: %q, %v", newKey, err)
	}
	if a, _ := h.m.Assignment(ctx, newKey, bootstrap.Poll{Rotate: true}); a.State != bootstrap.AssignNone || a.NewToken != "" || h.state(id) != Idle {
		t.Fatalf("clean poll with the new token: %s (new token %v), instance %s; want none, idle", a.State, a.NewToken != "", h.state(id))
	}
	h.restart()
	if _, err := h.m.Authenticate(bootstrap.HashToken(leaseToken)); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("old token after a restart: %v", err)
	}
	if k, err := h.m.Authenticate(bootstrap.HashToken(a.NewToken)); err != nil || k != key {
		t.Fatalf("new token after a restart: %q, %v", k, err)
	}
	// The next lease goes to the instance through the new token only.
	next := h.lease(LeaseRequest{})
	got, _ := h.m.Assignment(ctx, key, bootstrap.Poll{Rotate: true})
	if got.State != bootstrap.AssignAssigned || got.LeaseID != next.ID || got.NewToken != "" {
		t.Fatalf("next lease's assignment: %s %s", got.State, got.LeaseID)
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
