// Package store keeps Hangar's durable state in a bbolt file: instances
// (including launch intents: an instance record written before the cloud is
// asked to launch it), batches of instances launched by one call, leases and
// the store's owner id.
//
// Writes go through Commit, which appends them to one ordered queue. A single
// writer goroutine drains the queue into one bbolt transaction per round and
// fsyncs once for all of them (group commit). The caller waits on the
// returned channel before it acknowledges anything to a client, so whatever a
// client was told survives kill -9; concurrent callers share commits, so
// durability does not cap throughput. Because the queue is ordered, a caller
// that enqueues under its own lock gets its writes applied in that lock's
// order: a late write of an old snapshot can never overwrite a newer one.
package store

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Kind is a bucket of records.
type Kind string

const (
	Instances Kind = "instances"
	Leases    Kind = "leases"
	// Pools holds operators' runtime overrides (hangar scale).
	Pools Kind = "pools"
	// Demand holds each autoscaled pool's history of its demand.
	Demand Kind = "demand"
	// Batches holds launches of several instances in one cloud call: the
	// batch's intent (its slots are instances) and its enrollment token's
	// hash (pool/batch.go).
	Batches Kind = "batches"
	meta    Kind = "meta"
)

var kinds = []Kind{Instances, Leases, Pools, Demand, Batches, meta}

// Op is one write: a put of Value (JSON-encoded), or a delete when Value is nil.
type Op struct {
	Kind  Kind
	ID    string
	Value any
}

// Store is an open state file, or a store in memory (OpenMemory).
type Store struct {
	db    *bolt.DB
	owner string
	// In memory (db nil): the records, encoded; nil when every write is
	// discarded.
	mem map[Kind]map[string][]byte

	mu      sync.Mutex
	queue   []pending
	wake    chan struct{}
	closed  bool
	stopped chan struct{}

	commits, rounds atomic.Int64
}

// Stats count the store's writes since it was opened.
type Stats struct {
	// Commits are the Commit calls that carried writes.
	Commits int64
	// Rounds are the transactions written, each with its fsyncs: several
	// commits queued together share one round.
	Rounds int64
}

// Stats returns how many commits and write rounds the store has made.
func (s *Store) Stats() Stats {
	return Stats{Commits: s.commits.Load(), Rounds: s.rounds.Load()}
}

type pending struct {
	ops []encoded
	c   *Commit
}

// Commit is one queued write. Any number of goroutines may Wait on it.
type Commit struct {
	done chan struct{}
	err  error
}

// Wait blocks until the write is on disk (or failed) and returns its error.
func (c *Commit) Wait() error {
	<-c.done
	return c.err
}

func finished(err error) *Commit {
	c := &Commit{done: make(chan struct{}), err: err}
	close(c.done)
	return c
}

type encoded struct {
	kind Kind
	id   string
	val  []byte
}

// Open opens (creating if needed) the state file at path. Only one process
// may hold it; a second one gets an error after a second instead of waiting.
func Open(path string) (*Store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("opening state file %s: another hangar process holds it", path)
		}
		return nil, fmt.Errorf("opening state file %s: %w", path, err)
	}
	s := &Store{db: db, wake: make(chan struct{}, 1), stopped: make(chan struct{})}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, k := range kinds {
			if _, err := tx.CreateBucketIfNotExists([]byte(k)); err != nil {
				return err
			}
		}
		b := tx.Bucket([]byte(meta))
		if v := b.Get([]byte("owner")); v != nil {
			s.owner = string(v)
			return nil
		}
		var id [8]byte
		if _, err := rand.Read(id[:]); err != nil {
			return err
		}
		s.owner = "hangar-" + hex.EncodeToString(id[:])
		return b.Put([]byte("owner"), []byte(s.owner))
	})
	if err != nil {
		_ = db.Close() // the initialisation's error is the one to report
		return nil, fmt.Errorf("initialising state file %s: %w", path, err)
	}
	go s.writer()
	return s, nil
}

// OpenMemory returns a store with no file, for tests and simulations: it
// holds the records, encoded as a file's would be, for Load. Its commits
// are done when Commit returns, and its owner id is fixed.
func OpenMemory() *Store {
	s := &Store{owner: "hangar-memory", mem: map[Kind]map[string][]byte{}}
	for _, k := range kinds {
		s.mem[k] = map[string][]byte{}
	}
	return s
}

// Discard returns a store in memory that keeps nothing: Commit encodes
// nothing and is done at once, Load finds nothing. For simulations
// (pool/sim): a million simulated leases need not encode or fsync a
// million records.
func Discard() *Store {
	return &Store{owner: "hangar-memory"}
}

// doneCommit is every commit of a store in memory that discards.
var doneCommit = finished(nil)

// commitMemory is Commit on a store in memory.
func (s *Store) commitMemory(ops []Op) *Commit {
	if s.mem == nil {
		return doneCommit
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return finished(errors.New("state store is closed"))
	}
	var es []encoded
	for _, op := range ops {
		e := encoded{kind: op.Kind, id: op.ID}
		if op.Value != nil {
			b, err := json.Marshal(op.Value)
			if err != nil {
				return finished(fmt.Errorf("encoding %s %s: %w", op.Kind, op.ID, err))
			}
			e.val = b
		}
		es = append(es, e)
	}
	// Applied whole or not at all, as a file's transaction.
	for _, e := range es {
		if e.val == nil {
			delete(s.mem[e.kind], e.id)
		} else {
			s.mem[e.kind][e.id] = e.val
		}
	}
	if len(es) > 0 {
		s.commits.Add(1)
		s.rounds.Add(1)
	}
	return finished(nil)
}

// Owner is this store's id. Every instance launched is tagged with it, so a
// restarted server recognises its own instances and leaves others' alone.
func (s *Store) Owner() string { return s.owner }

// Commit queues ops to be written in one transaction, after everything queued
// before. Wait on the result to know they are on disk; since writes land in
// queue order, that also means everything queued earlier is. Commit itself
// never blocks on I/O, so callers may hold a lock. A Commit of no ops is a
// barrier: it costs no transaction and no fsync, and is done once
// everything queued before it is.
func (s *Store) Commit(ops ...Op) *Commit {
	if s.db == nil {
		return s.commitMemory(ops)
	}
	p := pending{c: &Commit{done: make(chan struct{})}}
	for _, op := range ops {
		e := encoded{kind: op.Kind, id: op.ID}
		if op.Value != nil {
			b, err := json.Marshal(op.Value)
			if err != nil {
				return finished(fmt.Errorf("encoding %s %s: %w", op.Kind, op.ID, err))
			}
			e.val = b
		}
		p.ops = append(p.ops, e)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return finished(errors.New("state store is closed"))
	}
	s.queue = append(s.queue, p)
	s.mu.Unlock()
	if len(p.ops) > 0 {
		s.commits.Add(1)
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
	return p.c
}

// CommitWait is Commit followed by Wait.
func (s *Store) CommitWait(ops ...Op) error { return s.Commit(ops...).Wait() }

func (s *Store) writer() {
	defer close(s.stopped)
	for range s.wake {
		s.mu.Lock()
		batch := s.queue
		s.queue = nil
		closed := s.closed
		s.mu.Unlock()
		writes := 0
		for _, p := range batch {
			writes += len(p.ops)
		}
		var err error
		if writes > 0 {
			s.rounds.Add(1)
			err = s.db.Update(func(tx *bolt.Tx) error {
				for _, p := range batch {
					for _, op := range p.ops {
						b := tx.Bucket([]byte(op.kind))
						var err error
						if op.val == nil {
							err = b.Delete([]byte(op.id))
						} else {
							err = b.Put([]byte(op.id), op.val)
						}
						if err != nil {
							return fmt.Errorf("writing %s %s: %w", op.kind, op.id, err)
						}
					}
				}
				return nil
			})
		}
		// A round of commits without writes (barriers: see Commit) is
		// done as soon as it is reached, for every round before it is.
		for _, p := range batch {
			p.c.err = err
			close(p.c.done)
		}
		if closed {
			return
		}
	}
}

// Load decodes every record of kind into a map by id.
func Load[T any](s *Store, kind Kind) (map[string]T, error) {
	out := map[string]T{}
	if s.db == nil {
		s.mu.Lock()
		defer s.mu.Unlock()
		for k, v := range s.mem[kind] {
			var t T
			if err := json.Unmarshal(v, &t); err != nil {
				return nil, fmt.Errorf("loading %s: decoding %s %s: %w", kind, kind, k, err)
			}
			out[k] = t
		}
		return out, nil
	}
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(kind)).ForEach(func(k, v []byte) error {
			var t T
			if err := json.Unmarshal(v, &t); err != nil {
				return fmt.Errorf("decoding %s %s: %w", kind, k, err)
			}
			out[string(k)] = t
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", kind, err)
	}
	return out, nil
}

// Close writes what is queued and closes the file.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	if s.db == nil {
		return nil
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
	<-s.stopped
	return s.db.Close()
}
