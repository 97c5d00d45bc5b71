package pool

import (
	"context"
	"errors"
	"testing"
)

// TestLeasesBelongToTheirCaller: a lease-role caller sees and acts only on
// its own leases; anyone else is told they do not exist. Before, any lease
// token could read another's lease with its worker password, renew,
// release or run commands on it, and take it over by its client token.
func TestLeasesBelongToTheirCaller(t *testing.T) {
	h := newHarness(t, nil)
	h.warm(2)
	ctx := context.Background()
	alice, bob := Caller{Name: "alice"}, Caller{Name: "bob"}

	mine, err := h.m.Lease(ctx, alice, LeaseRequest{Pool: "demo", ClientToken: "gitlab-job-42"})
	if err != nil || mine.State != LeaseActive {
		t.Fatalf("alice's lease: %v, %+v", err, mine)
	}
	if mine.Owner != "alice" || mine.Worker.Password == "" {
		t.Fatalf("alice's lease: owner %q, password set %v", mine.Owner, mine.Worker.Password != "")
	}

	notFound := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, ErrUnknownLease) {
			t.Errorf("bob %s alice's lease: err %v, want %v", what, err, ErrUnknownLease)
		}
	}
	_, err = h.m.GetLease(ctx, bob, mine.ID, 0)
	notFound("reading", err)
	_, err = h.m.Renew(ctx, bob, mine.ID)
	notFound("renewing", err)
	notFound("releasing", h.m.Release(ctx, bob, mine.ID, true))
	_, err = h.m.StartRun(ctx, bob, mine.ID, []string{"cat", "/etc/shadow"})
	notFound("running on", err)
	_, err = h.m.Output(ctx, bob, mine.ID, 0, 0, "", 0)
	notFound("reading the output of", err)

	// The same client token from another caller is another lease.
	theirs, err := h.m.Lease(ctx, bob, LeaseRequest{Pool: "demo", ClientToken: "gitlab-job-42"})
	if err != nil {
		t.Fatal(err)
	}
	if theirs.ID == mine.ID || theirs.Worker.Password == mine.Worker.Password {
		t.Fatal("bob's lease with alice's client token is alice's lease")
	}
	again, err := h.m.Lease(ctx, alice, LeaseRequest{Pool: "demo", ClientToken: "gitlab-job-42"})
	if err != nil || again.ID != mine.ID {
		t.Fatalf("alice asking again with her client token: %v, lease %s, want %s", err, again.ID, mine.ID)
	}

	// Lists: each sees its own; instances show only their own lease ids.
	for _, c := range []struct {
		who  Caller
		want string
	}{{alice, mine.ID}, {bob, theirs.ID}} {
		list, err := h.m.Leases(c.who, "", "")
		if err != nil || len(list) != 1 || list[0].ID != c.want {
			t.Errorf("%s lists %+v (%v), want only %s", c.who.Name, list, err, c.want)
		}
		if len(list) == 1 && list[0].Worker.Password != "" {
			t.Error("a lease list carries worker passwords")
		}
		insts, err := h.m.Instances(c.who, "")
		if err != nil {
			t.Fatal(err)
		}
		for _, in := range insts {
			if in.LeaseID != "" && in.LeaseID != c.want {
				t.Errorf("%s sees another owner's lease id %s on instance %s", c.who.Name, in.LeaseID, in.ID)
			}
		}
	}
	if list, _ := h.m.Leases(Admin, "demo", LeaseActive); len(list) != 2 {
		t.Errorf("admin lists %d active leases, want 2", len(list))
	}
	if _, err := h.m.Leases(alice, "", "bogus"); !errors.Is(err, ErrInvalid) {
		t.Errorf("listing state bogus: %v, want %v", err, ErrInvalid)
	}
	if _, err := h.m.Leases(alice, "nope", ""); !errors.Is(err, ErrUnknownPool) {
		t.Errorf("listing pool nope: %v, want %v", err, ErrUnknownPool)
	}

	// The admin acts on anyone's.
	if err := h.m.Release(ctx, Admin, theirs.ID, false); err != nil {
		t.Fatalf("admin releasing bob's lease: %v", err)
	}
	if v, err := h.m.GetLease(ctx, alice, mine.ID, 0); err != nil || v.State != LeaseActive {
		t.Fatalf("alice's lease after all that: %v, %s", err, v.State)
	}
}
