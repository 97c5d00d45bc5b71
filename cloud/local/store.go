package local

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// On-disk layout of one region's tree: Options.Dir itself for the region
// "local", Options.Dir/regions/<region> for any other. Every file is replaced
// atomically, so a reader never needs the lock; writers hold it.
//
//	lock                      flock(2) serializing mutations across processes
//	metadata.addr             last address of the metadata service
//	metadata.secret           proves a service on that address is this tree's
//	identity.key, identity.pem  signs instance identity documents (identity.go)
//	instances/<id>/instance.json
//	instances/<id>/user-data  raw, served by the metadata service
//	instances/<id>/parts/     what the boot wrapper runs (*.sh) or prints
//	instances/<id>/console.log
//	instances/<id>/disk/      cwd and HOME of the instance's processes, and its
//	                          HANGAR_ROOT; disk/dev/<sdX> link attached volumes
//	instances/<id>/ssh/       with a key pair: host key, authorized_keys,
//	                          sshd_config, sshd.log, sshd.pid
//	terminated/<id>.json      tombstone: listed for tombstoneListed, kept for tokenKept
//	tokens/<sha256(token)>.json
//	trash/                    directories of terminated instances and deleted
//	                          volumes and snapshots, being removed
//	storage/keypairs/<name>.pub
//	storage/volumes/<vol-id>/volume.json, and data/ or (raw) disk.img
//	storage/snapshots/<snap-id>/snapshot.json, and data/ or disk.img
//	storage/images/<ami-id>.json
//	storage/tmp/<id>.<unix>/  volumes and snapshots being made; renamed into
//	                          place when complete, so none is listed half-made
//	regions/<region>/         the tree of another region (under the "local" tree)
const (
	tombstoneListed = time.Hour
	// tokenKept bounds how long a retried Launch still gets its old
	// (terminated) instances back instead of new ones.
	tokenKept = 24 * time.Hour
	gcEvery   = 10 * time.Minute
)

// record is one instance as stored in instance.json or a tombstone.
type record struct {
	ID string `json:"id"`
	// State is one of running, stopping, stopped, terminating, terminated.
	// Pending is never stored: it is running before BootAt.
	State      cloud.State       `json:"state"`
	Type       string            `json:"type"`
	Zone       string            `json:"zone"`
	Image      string            `json:"image"`
	Tags       map[string]string `json:"tags,omitempty"`
	LaunchedAt time.Time         `json:"launched_at"`
	// BootAt is when the boot wrapper stops sleeping and runs the user-data.
	BootAt    time.Time `json:"boot_at"`
	PrivateIP string    `json:"private_ip,omitempty"`
	// PGID is the process group (and session) of the current boot; LeaderStart
	// is its leader's start time in clock ticks, which tells our group from a
	// later one that reuses the number.
	PGID        int    `json:"pgid,omitempty"`
	LeaderStart uint64 `json:"leader_start,omitempty"`
	ClientToken string `json:"client_token"`
	MetadataKey string `json:"metadata_key,omitempty"`
	// KeyName is the key pair whose key the instance's sshd lets in; an
	// instance without one runs no sshd.
	KeyName string `json:"key_name,omitempty"`
	// RootGB is the size of the root disk, for images made of it.
	RootGB int `json:"root_gb,omitempty"`
	// HaltingSince is when a Stop or Terminate moved the instance to
	// stopping or terminating; zero in other states. A record found in one
	// of those states long after it was a call that crashed, which the next
	// Stop or Terminate finishes.
	HaltingSince time.Time `json:"halting_since,omitzero"`
	TerminatedAt time.Time `json:"terminated_at,omitzero"`
	// LaunchIndex is the instance's place in its launch (cloud.Instance).
	LaunchIndex int `json:"launch_index,omitempty"`
}

func (r *record) instance(now time.Time) cloud.Instance {
	st := r.State
	if st == cloud.StateRunning && now.Before(r.BootAt) {
		st = cloud.StatePending
	}
	tags := make(map[string]string, len(r.Tags))
	for k, v := range r.Tags {
		tags[k] = v
	}
	return cloud.Instance{
		ID:          r.ID,
		State:       st,
		PrivateIP:   r.PrivateIP,
		Type:        r.Type,
		Zone:        r.Zone,
		Image:       r.Image,
		Tags:        tags,
		LaunchedAt:  r.LaunchedAt,
		LaunchIndex: r.LaunchIndex,
	}
}

type store struct {
	dir string
	log *slog.Logger
	// sem serializes goroutines of this process before they take the flock,
	// so that waiting for the lock can honour a context.
	sem chan struct{}
}

func openStore(dir string, log *slog.Logger) (*store, error) {
	for _, d := range []string{"instances", "terminated", "tokens", "trash",
		"storage/keypairs", "storage/volumes", "storage/snapshots", "storage/images", "storage/tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("creating local cloud directory: %w", err)
		}
	}
	return &store{dir: dir, log: log, sem: make(chan struct{}, 1)}, nil
}

func (s *store) instanceDir(id string) string { return filepath.Join(s.dir, "instances", id) }
func (s *store) recordPath(id string) string {
	return filepath.Join(s.instanceDir(id), "instance.json")
}
func (s *store) tombstonePath(id string) string {
	return filepath.Join(s.dir, "terminated", id+".json")
}
func (s *store) tokenPath(token string) string {
	sum := sha256.Sum256([]byte(token))
	return filepath.Join(s.dir, "tokens", hex.EncodeToString(sum[:])+".json")
}

// lock takes the cross-process lock. The returned func releases it.
func (s *store) lock(ctx context.Context) (func(), error) {
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for the local cloud lock: %w", ctx.Err())
	}
	f, err := os.OpenFile(filepath.Join(s.dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		<-s.sem
		return nil, fmt.Errorf("opening the local cloud lock: %w", err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			_ = f.Close()
			<-s.sem
			return nil, fmt.Errorf("locking the local cloud: %w", err)
		}
		select {
		case <-time.After(5 * time.Millisecond):
		case <-ctx.Done():
			_ = f.Close()
			<-s.sem
			return nil, fmt.Errorf("waiting for the local cloud lock: %w", ctx.Err())
		}
	}
	return func() {
		_ = f.Close() // closing the only descriptor releases the flock
		<-s.sem
	}, nil
}

// writeFile replaces path atomically.
func writeFile(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() { _ = os.Remove(tmp.Name()) }() // fails harmlessly after the rename
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeFile(path, append(b, '\n'), 0o600)
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	return nil
}

func (s *store) metadataAddrPath() string { return filepath.Join(s.dir, "metadata.addr") }

// metadataSecret returns the tree's metadata secret, made on first use. The
// caller holds the lock, so that two processes cannot make different ones.
func (s *store) metadataSecret() ([]byte, error) {
	path := filepath.Join(s.dir, "metadata.secret")
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("reading metadata secret: %w", err)
	}
	if secret := bytes.TrimSpace(b); len(secret) >= 32 {
		return secret, nil
	}
	secret := []byte(randHex(32))
	if err := writeFile(path, append(secret, '\n'), 0o600); err != nil {
		return nil, fmt.Errorf("saving metadata secret: %w", err)
	}
	return secret, nil
}

func (s *store) putRecord(r *record) error {
	if err := writeJSON(s.recordPath(r.ID), r); err != nil {
		return fmt.Errorf("saving instance %s: %w", r.ID, err)
	}
	return nil
}

// getRecord returns the live record of id, or else its tombstone, or an error
// matching fs.ErrNotExist.
func (s *store) getRecord(id string) (*record, error) {
	if !validID(id) {
		return nil, fs.ErrNotExist
	}
	var r record
	err := readJSON(s.tombstonePath(id), &r)
	if errors.Is(err, fs.ErrNotExist) {
		err = readJSON(s.recordPath(id), &r)
	}
	if err != nil {
		return nil, err
	}
	return &r, nil
}

// records returns every live instance and every tombstone younger than
// maxTombstoneAge.
func (s *store) records(now time.Time, maxTombstoneAge time.Duration) ([]*record, error) {
	byID := map[string]*record{}
	ents, err := os.ReadDir(filepath.Join(s.dir, "instances"))
	if err != nil {
		return nil, fmt.Errorf("listing local instances: %w", err)
	}
	for _, e := range ents {
		if !validID(e.Name()) {
			continue
		}
		var r record
		// A record may vanish under us when another process terminates it.
		// One unreadable record must not hide all the others.
		if err := readJSON(s.recordPath(e.Name()), &r); err == nil {
			byID[r.ID] = &r
		} else if !errors.Is(err, fs.ErrNotExist) {
			s.log.Error("skipping unreadable local instance", "id", e.Name(), "err", err)
		}
	}
	ents, err = os.ReadDir(filepath.Join(s.dir, "terminated"))
	if err != nil {
		return nil, fmt.Errorf("listing terminated local instances: %w", err)
	}
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || !validID(id) {
			continue
		}
		var r record
		if err := readJSON(s.tombstonePath(id), &r); err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				s.log.Error("skipping unreadable tombstone", "id", id, "err", err)
			}
			continue
		}
		if now.Sub(r.TerminatedAt) < maxTombstoneAge {
			byID[id] = &r // a tombstone wins over a record not yet removed
		} else {
			delete(byID, id)
		}
	}
	out := make([]*record, 0, len(byID))
	for _, r := range byID {
		out = append(out, r)
	}
	return out, nil
}

// bury replaces the record of r with a tombstone and moves its directory to
// the trash. The caller removes the returned trash path without the lock.
func (s *store) bury(r *record, now time.Time) (trash string, err error) {
	t := *r
	t.State = cloud.StateTerminated
	t.TerminatedAt = now
	t.PrivateIP = "" // free for reuse, as EC2 does
	t.MetadataKey = ""
	t.PGID, t.LeaderStart = 0, 0
	t.HaltingSince = time.Time{}
	if err := writeJSON(s.tombstonePath(r.ID), &t); err != nil {
		return "", fmt.Errorf("saving tombstone of %s: %w", r.ID, err)
	}
	trash = filepath.Join(s.dir, "trash", fmt.Sprintf("%s-%s.%d", r.ID, randHex(4), now.Unix()))
	if err := os.Rename(s.instanceDir(r.ID), trash); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("removing disk of %s: %w", r.ID, err)
	}
	return trash, nil
}

// discardLeftover moves the directory of id, terminated, to the trash if a
// crash between its tombstone and its removal left it behind. It returns ""
// when there is none. The caller holds the lock and removes what it returns.
func (s *store) discardLeftover(id string, now time.Time) (trash string, err error) {
	trash, err = s.discard(s.instanceDir(id), id, now)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	return trash, err
}

// discard moves path, a directory named id, into the trash, where gc finds
// it if the caller crashes before removing the returned path (which it does
// without the lock, since removing may take a while).
func (s *store) discard(path, id string, now time.Time) (trash string, err error) {
	trash = filepath.Join(s.dir, "trash", fmt.Sprintf("%s-%s.%d", id, randHex(4), now.Unix()))
	if err := os.Rename(path, trash); err != nil {
		return "", err
	}
	return trash, nil
}

type tokenFile struct {
	IDs []string `json:"ids"`
}

func (s *store) tokenIDs(token string) ([]string, bool, error) {
	var t tokenFile
	err := readJSON(s.tokenPath(token), &t)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("reading client token: %w", err)
	}
	return t.IDs, true, nil
}

func (s *store) putToken(token string, ids []string) error {
	if err := writeJSON(s.tokenPath(token), tokenFile{IDs: ids}); err != nil {
		return fmt.Errorf("saving client token: %w", err)
	}
	return nil
}

// gc drops tombstones older than tokenKept, tokens whose instances are all
// gone and older than tokenKept, and trash left behind by a crash. The caller
// holds the lock.
func (s *store) gc(now time.Time) error {
	var errs []error
	ents, err := os.ReadDir(filepath.Join(s.dir, "terminated"))
	errs = append(errs, err)
	for _, e := range ents {
		// A crash between tombstone and removal leaves the disk behind.
		if id, ok := strings.CutSuffix(e.Name(), ".json"); ok && validID(id) {
			errs = append(errs, os.RemoveAll(s.instanceDir(id)))
		}
		if info, err := e.Info(); err == nil && now.Sub(info.ModTime()) > tokenKept {
			errs = append(errs, os.Remove(filepath.Join(s.dir, "terminated", e.Name())))
		}
	}
	ents, err = os.ReadDir(filepath.Join(s.dir, "tokens"))
	errs = append(errs, err)
	for _, e := range ents {
		path := filepath.Join(s.dir, "tokens", e.Name())
		info, err := e.Info()
		if err != nil || now.Sub(info.ModTime()) <= tokenKept {
			continue
		}
		var t tokenFile
		if err := readJSON(path, &t); err != nil {
			errs = append(errs, err)
			continue
		}
		if !slices.ContainsFunc(t.IDs, s.exists) {
			errs = append(errs, os.Remove(path))
		}
	}
	ents, err = os.ReadDir(filepath.Join(s.dir, "trash"))
	errs = append(errs, err)
	for _, e := range ents {
		// Young entries may still be being removed by the process that put them there.
		_, stamp, _ := strings.Cut(e.Name(), ".")
		if sec, err := strconv.ParseInt(stamp, 10, 64); err != nil || now.Sub(time.Unix(sec, 0)) > time.Hour {
			errs = append(errs, os.RemoveAll(filepath.Join(s.dir, "trash", e.Name())))
		}
	}
	ents, err = os.ReadDir(filepath.Join(s.dir, "storage", "tmp"))
	errs = append(errs, err)
	for _, e := range ents {
		// Copies of big volumes take a while; a day-old one was left by a crash.
		_, stamp, _ := strings.Cut(e.Name(), ".")
		if sec, err := strconv.ParseInt(stamp, 10, 64); err != nil || now.Sub(time.Unix(sec, 0)) > tokenKept {
			errs = append(errs, os.RemoveAll(filepath.Join(s.dir, "storage", "tmp", e.Name())))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleaning up the local cloud: %w", err)
	}
	return nil
}

func (s *store) exists(id string) bool {
	for _, p := range []string{s.instanceDir(id), s.tombstonePath(id)} {
		if _, err := os.Stat(p); err == nil {
			return true
		}
	}
	return false
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b) // never fails on Linux
	return hex.EncodeToString(b)
}

// newID returns an EC2-shaped id: "i-" and 17 hex digits.
func newID() string { return "i-" + randHex(9)[:17] }

func validID(id string) bool { return validResourceID("i", id) }

// newResourceID returns an EC2-shaped id of another kind: "vol-", "snap-" or
// "ami-" and 17 hex digits.
func newResourceID(kind string) string { return kind + "-" + randHex(9)[:17] }

// validResourceID also keeps ids that become file names from leaving their
// directory.
func validResourceID(kind, id string) bool {
	digits, ok := strings.CutPrefix(id, kind+"-")
	if !ok || len(digits) != 17 {
		return false
	}
	for _, c := range digits {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}
