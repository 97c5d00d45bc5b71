package store

import (
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

type rec struct {
	N int    `json:"n"`
	S string `json:"s"`
}

func TestCommitSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	owner := s.Owner()
	if !strings.HasPrefix(owner, "hangar-") {
		t.Fatalf("owner %q", owner)
	}
	if err := s.CommitWait(Op{Instances, "a", rec{1, "x"}}, Op{Leases, "l", rec{2, "y"}}); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitWait(Op{Instances, "b", rec{3, "z"}}, Op{Instances, "a", nil}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore(t, s)
	if s.Owner() != owner {
		t.Errorf("owner changed across reopen: %q then %q", owner, s.Owner())
	}
	inst, err := Load[rec](s, Instances)
	if err != nil {
		t.Fatal(err)
	}
	if len(inst) != 1 || inst["b"] != (rec{3, "z"}) {
		t.Errorf("instances = %v, want only b", inst)
	}
	leases, _ := Load[rec](s, Leases)
	if leases["l"] != (rec{2, "y"}) {
		t.Errorf("leases = %v", leases)
	}
}

func TestSecondOpenRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore(t, s)
	_, err = Open(path)
	if err == nil || !strings.Contains(err.Error(), "another hangar process holds it") {
		t.Fatalf("second open: %v", err)
	}
}

// Writes enqueued in an order land in that order, whichever goroutine's
// commit round carries them.
func TestCommitsKeepQueueOrder(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore(t, s)
	var mu sync.Mutex
	n := 0
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				mu.Lock()
				n++
				done := s.Commit(Op{Instances, "shared", rec{N: n}}, Op{Leases, fmt.Sprint(n), rec{N: n}})
				mu.Unlock()
				if err := done.Wait(); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	got, _ := Load[rec](s, Instances)
	if got["shared"].N != 400 {
		t.Errorf("last write = %d, want 400 (an older write landed after a newer one)", got["shared"].N)
	}
	leases, _ := Load[rec](s, Leases)
	if len(leases) != 400 {
		t.Errorf("%d lease records, want 400", len(leases))
	}
}

func TestCommitAfterClose(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitWait(Op{Instances, "a", rec{}}); err == nil {
		t.Fatal("commit after close succeeded")
	}
}

func BenchmarkCommitParallel(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "state.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer closeStore(b, s)
	b.SetParallelism(16)
	var i int64
	var mu sync.Mutex
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			mu.Lock()
			i++
			id := fmt.Sprint(i)
			mu.Unlock()
			if err := s.CommitWait(Op{Leases, id, rec{N: 1}}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkCommit is one writer waiting for each commit: the fsync cost a
// lone lease request pays.
func BenchmarkCommit(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "state.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer closeStore(b, s)
	for i := 0; i < b.N; i++ {
		if err := s.CommitWait(Op{Leases, fmt.Sprint(i), rec{N: i}}); err != nil {
			b.Fatal(err)
		}
	}
}

// A commit without writes is a barrier: done once everything queued before
// it is, without a transaction (and its fsyncs) of its own.
func TestEmptyCommitIsBarrier(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore(t, s)
	for i := 0; i < 20; i++ {
		write := s.Commit(Op{Leases, fmt.Sprint(i), rec{N: i}})
		if err := s.Commit().Wait(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-write.done:
		default:
			t.Fatalf("round %d: the barrier was done before the write queued ahead of it", i)
		}
	}
	if err := s.CommitWait(); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Commits != 20 || st.Rounds > 20 {
		t.Errorf("stats %+v, want 20 commits in at most 20 rounds (barriers cost none)", st)
	}
}

// closeStore closes s at the end of a test, failing it if that fails.
func closeStore(tb testing.TB, s *Store) {
	tb.Helper()
	if err := s.Close(); err != nil {
		tb.Error(err)
	}
}

// TestMemoryStore: a store in memory keeps what was committed, deletes
// included, for Load, as a file does; a discarding one keeps nothing and
// never fails a commit.
func TestMemoryStore(t *testing.T) {
	s := OpenMemory()
	if err := s.CommitWait(Op{Instances, "a", rec{1, "x"}}, Op{Instances, "b", rec{2, "y"}}); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitWait(Op{Instances, "a", nil}); err != nil {
		t.Fatal(err)
	}
	got, err := Load[rec](s, Instances)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got["b"] != (rec{2, "y"}) {
		t.Errorf("instances = %v, want only b", got)
	}
	if err := s.CommitWait(Op{Leases, "bad", func() {}}); err == nil {
		t.Error("a record that cannot be encoded was committed")
	}
	if st := s.Stats(); st.Commits != 2 {
		t.Errorf("stats %+v, want 2 commits", st)
	}
	closeStore(t, s)
	if err := s.CommitWait(Op{Instances, "c", rec{}}); err == nil {
		t.Error("commit to a closed memory store succeeded")
	}

	d := Discard()
	if err := d.CommitWait(Op{Instances, "a", rec{1, "x"}}); err != nil {
		t.Fatal(err)
	}
	if got, err := Load[rec](d, Instances); err != nil || len(got) != 0 {
		t.Errorf("a discarding store loaded %v, %v; want nothing", got, err)
	}
	closeStore(t, d)
}
