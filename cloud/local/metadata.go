package local

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// The metadata service speaks the EC2 IMDSv2 paths under a per-instance
// prefix: http://127.0.0.1:PORT/<metadata key>/latest/… . The key tells the
// instance apart (all instances share the loopback interface) and keeps other
// local users from reading an instance's user-data.
//
// One service per tree, shared by the processes that open it. Instances
// outlive the process that launched them and keep, in their environment, the
// URL they were booted with; and several processes open the same tree at
// once (hangar serve, and beside it hangar staging or image bake, each with a
// Provider of its own). So the tree has one service at one address, saved in
// metadata.addr, and whichever process holds that port answers for every
// instance of the tree, reading the records it did not write from the store
// (recordByKey).
//
//   - The kernel's bind is the lock: the process that binds the saved port
//     owns the service (Go sets SO_REUSEADDR, never SO_REUSEPORT, so no
//     second listener can bind a port while one listens on it).
//   - A process that cannot bind it asks what holds it to prove it is this
//     tree's service: an HMAC, under metadata.secret (a 0600 file only the
//     tree's user can read), of a fresh challenge and of the address dialed,
//     so that a stranger on the port, or one relaying to the real service,
//     is not trusted. If the proof holds, the process listens nowhere and
//     gives its instances the saved URL. Only a stranger on the port makes it
//     listen on a new port and save that, as every second process did before
//     there was sharing; the instances booted with the old URL have lost
//     their service to the stranger either way.
//   - A process that shares tries to bind the port every takeOverEvery, so
//     that when the owner ends (a staging command that finishes, a server
//     restarted) another takes over the same URL and running instances are
//     answered again within that interval. A failed bind is one system call,
//     so a short fixed interval costs nothing, where a backoff would make
//     the gap grow with the age of the owner.
//   - Before an instance boots, a sharing process checks again (under the
//     store's lock, as the choice at start is, so that two processes never
//     both pick a new port): it takes over if the port is free, shares if
//     the proof holds, and moves only if a stranger holds the port.

const (
	tokenTTLHeader = "X-aws-ec2-metadata-token-ttl-seconds"
	tokenHeader    = "X-aws-ec2-metadata-token"
	maxTokenTTL    = 21600

	// identityPath answers the challenge of another process of the tree.
	// No metadata key (32 hex digits) is "hangar".
	identityPath         = "/hangar/identity"
	identityProbeTimeout = 3 * time.Second
	takeOverEvery        = 500 * time.Millisecond
)

// metadataService is one Provider's side of its tree's metadata service.
type metadataService struct {
	srv    *http.Server
	secret []byte // metadata.secret, the tree's proof of identity
	want   string // the configured listen address; port 0 means any
	fixed  bool   // want names a port, which is then never moved from

	// mu is held across a claim (binds and probes); request handlers never
	// take it, so a probe cannot wait on its own process.
	mu     sync.Mutex
	addr   string       // host:port of the URL instances are given
	ln     net.Listener // non-nil while this process serves addr
	closed bool
	stop   chan struct{} // closed by Close: ends the take-over loop
	loop   sync.WaitGroup
	// looping is set once the take-over loop has started; it ends when this
	// process owns the service or is closed.
	looping bool
}

// openMetadata starts this Provider's side of the service: it owns it, or
// shares another process's, or (a stranger holding the saved port) moves it.
func (p *Provider) openMetadata(ctx context.Context, addr string) error {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("parsing metadata address: %w", err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("metadata service must listen on a loopback IP address, got %q", addr)
	}
	p.md.want, p.md.fixed = addr, port != "0"
	p.md.stop = make(chan struct{})
	unlock, err := p.store.lock(ctx)
	if err != nil {
		return fmt.Errorf("starting metadata service: %w", err)
	}
	defer unlock()
	if p.md.secret, err = p.store.metadataSecret(); err != nil {
		return fmt.Errorf("starting metadata service: %w", err)
	}
	// With port 0, the port of the last run, which instances still running
	// have in their environment.
	target := addr
	if !p.md.fixed {
		target = ""
		if b, err := os.ReadFile(p.store.metadataAddrPath()); err == nil {
			if _, oldPort, err := net.SplitHostPort(strings.TrimSpace(string(b))); err == nil {
				target = net.JoinHostPort(host, oldPort)
			}
		}
	}
	p.md.mu.Lock()
	defer p.md.mu.Unlock()
	return p.claimMetadataLocked(ctx, target, true)
}

// ensureMetadata runs before instances boot, with the store's lock held: a
// process that shares the service checks that it is still there, which
// takes it over if its owner has gone.
func (p *Provider) ensureMetadata(ctx context.Context) error {
	p.md.mu.Lock()
	defer p.md.mu.Unlock()
	if p.md.ln != nil || p.md.closed {
		return nil
	}
	return p.claimMetadataLocked(ctx, p.md.addr, false)
}

// claimMetadataLocked serves target (saving it if save is set), or shares
// the service of another process of this tree on it, or else listens anew;
// target "" is no address yet. The caller holds the store's lock and md.mu.
func (p *Provider) claimMetadataLocked(ctx context.Context, target string, save bool) error {
	if target != "" {
		ln, err := net.Listen("tcp", target)
		if err == nil {
			return p.serveMetadataLocked(ln, save)
		}
		perr := p.probeMetadataPatiently(ctx, target)
		if perr == nil {
			if p.md.addr != target {
				p.log.Info("sharing the metadata service of another process on this directory", "addr", target)
			}
			p.md.addr = target
			p.startTakeOverLocked()
			return nil
		}
		if p.md.fixed {
			return fmt.Errorf("starting metadata service: %w; what holds the port is not this directory's metadata service: %w", err, perr)
		}
		p.log.Warn("metadata service moved to a new port; running instances keep the old URL until restarted",
			"old_addr", target, "err", err, "probe", perr)
	}
	ln, err := net.Listen("tcp", p.md.want)
	if err != nil {
		return fmt.Errorf("starting metadata service: %w", err)
	}
	return p.serveMetadataLocked(ln, true)
}

// serveMetadataLocked serves ln, saving its address for later processes
// when save is set. The caller holds md.mu (and, to save, the store's lock).
func (p *Provider) serveMetadataLocked(ln net.Listener, save bool) error {
	if save {
		if err := writeFile(p.store.metadataAddrPath(), []byte(ln.Addr().String()+"\n"), 0o600); err != nil {
			_ = ln.Close()
			return fmt.Errorf("saving metadata address: %w", err)
		}
	}
	p.md.addr, p.md.ln = ln.Addr().String(), ln
	go func() {
		// After Close, Serve closes ln and returns ErrServerClosed.
		if err := p.md.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			p.log.Error("metadata service stopped", "err", err)
		}
	}()
	return nil
}

func (p *Provider) startTakeOverLocked() {
	if p.md.looping || p.md.closed {
		return
	}
	p.md.looping = true
	p.md.loop.Add(1)
	go func() {
		defer p.md.loop.Done()
		t := time.NewTicker(takeOverEvery)
		defer t.Stop()
		for {
			select {
			case <-p.md.stop:
				return
			case <-t.C:
			}
			if p.tryTakeOver() {
				return
			}
		}
	}()
}

// tryTakeOver binds the shared address if its owner has let it go, and
// reports whether there is nothing left to wait for. A take-over saves
// nothing: metadata.addr names the address already, unless a process has
// moved the service since, and then later processes had better share that
// one.
func (p *Provider) tryTakeOver() bool {
	p.md.mu.Lock()
	defer p.md.mu.Unlock()
	if p.md.closed || p.md.ln != nil {
		return true
	}
	ln, err := net.Listen("tcp", p.md.addr)
	if err != nil {
		return false // the owner is still there (or a stranger is)
	}
	_ = p.serveMetadataLocked(ln, false) // cannot fail without saving
	p.log.Info("took over the metadata service of this directory", "addr", p.md.addr)
	return true
}

// closeMetadata stops serving (or waiting to serve). Instances keep running.
func (p *Provider) closeMetadata() error {
	p.md.mu.Lock()
	if !p.md.closed {
		p.md.closed = true
		close(p.md.stop)
	}
	p.md.mu.Unlock()
	p.md.loop.Wait()
	return p.md.srv.Close()
}

// ownsMetadata reports whether this process serves the metadata service.
func (p *Provider) ownsMetadata() bool {
	p.md.mu.Lock()
	defer p.md.mu.Unlock()
	return p.md.ln != nil
}

// errNotThisService is a probe answered, but not by this tree's service.
var errNotThisService = errors.New("not this directory's metadata service")

// probeMetadataPatiently is probeMetadata, asked again when no answer came
// (an owner slow under load): only an answer that is wrong makes the
// service move, and with it every later instance's URL.
func (p *Provider) probeMetadataPatiently(ctx context.Context, addr string) error {
	var err error
	for attempt, pause := 1, 200*time.Millisecond; ; attempt, pause = attempt+1, pause*2 {
		err = p.probeMetadata(ctx, addr)
		if err == nil || errors.Is(err, errNotThisService) || attempt == 3 {
			return err
		}
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			return err
		}
	}
}

// probeMetadata checks that addr is served by this tree's metadata service.
func (p *Provider) probeMetadata(ctx context.Context, addr string) error {
	challenge := randHex(16)
	ctx, cancel := context.WithTimeout(ctx, identityProbeTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+identityPath+"?challenge="+challenge, nil)
	if err != nil {
		return fmt.Errorf("probing %s: %w", addr, err)
	}
	// No proxy, no kept connection, no redirect: only what answers on addr.
	client := &http.Client{
		Transport:     &http.Transport{DisableKeepAlives: true},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("probing %s: %w", addr, err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 256))
	if err != nil {
		return fmt.Errorf("probing %s: %w", addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("probing %s: %s: %w", addr, resp.Status, errNotThisService)
	}
	if !hmac.Equal(body, []byte(identityProof(p.md.secret, addr, challenge))) {
		return fmt.Errorf("probing %s: wrong proof of identity: %w", addr, errNotThisService)
	}
	return nil
}

// proveIdentity answers probeMetadata, for the address the request came to.
func (p *Provider) proveIdentity(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodGet {
		w.Header().Set("Allow", "GET")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	challenge := req.URL.Query().Get("challenge")
	if _, err := hex.DecodeString(challenge); err != nil || len(challenge) != 32 {
		http.Error(w, "missing or invalid challenge", http.StatusBadRequest)
		return
	}
	local, ok := req.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if !ok {
		http.Error(w, "no local address", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	_, _ = fmt.Fprint(w, identityProof(p.md.secret, local.String(), challenge))
}

func identityProof(secret []byte, addr, challenge string) string {
	if ap, err := netip.ParseAddrPort(addr); err == nil {
		addr = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
	}
	mac := hmac.New(sha256.New, secret)
	_, _ = fmt.Fprintf(mac, "hangar-local-metadata\x00%s\x00%s", addr, challenge)
	return hex.EncodeToString(mac.Sum(nil))
}

func (p *Provider) serveMetadata(w http.ResponseWriter, req *http.Request) {
	if req.URL.Path == identityPath {
		p.proveIdentity(w, req)
		return
	}
	key, path, _ := strings.Cut(strings.TrimPrefix(req.URL.Path, "/"), "/")
	r := p.recordByKey(key)
	if r == nil {
		http.NotFound(w, req)
		return
	}
	if path == "latest/api/token" {
		p.issueToken(w, req, r)
		return
	}
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	if !p.validToken(r, req.Header.Get(tokenHeader)) {
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	if name, ok := strings.CutPrefix(path, "latest/dynamic/instance-identity/"); ok {
		p.serveIdentity(w, req, r, name)
		return
	}
	if path == "latest/user-data" {
		b, err := os.ReadFile(filepath.Join(p.store.instanceDir(r.ID), "user-data"))
		if err != nil || len(b) == 0 {
			http.NotFound(w, req)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(b)
		return
	}
	meta := map[string]string{
		"instance-id":                 r.ID,
		"local-ipv4":                  r.PrivateIP,
		"instance-type":               r.Type,
		"placement/availability-zone": r.Zone,
		"ami-id":                      r.Image,
	}
	name, ok := strings.CutPrefix(path, "latest/meta-data/")
	if path == "latest/meta-data" || ok && name == "" {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = fmt.Fprint(w, "ami-id\ninstance-id\ninstance-type\nlocal-ipv4\nplacement/\n")
		return
	}
	v, found := meta[name]
	if !ok || !found {
		http.NotFound(w, req)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	_, _ = fmt.Fprint(w, v)
}

func (p *Provider) issueToken(w http.ResponseWriter, req *http.Request, r *record) {
	if req.Method != http.MethodPut {
		w.Header().Set("Allow", "PUT")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	// As EC2 does: a proxied token request is refused.
	if req.Header.Get("X-Forwarded-For") != "" {
		http.Error(w, "forbidden", http.StatusForbidden)
		return
	}
	ttl, err := strconv.Atoi(req.Header.Get(tokenTTLHeader))
	if err != nil || ttl < 1 || ttl > maxTokenTTL {
		http.Error(w, "missing or invalid "+tokenTTLHeader, http.StatusBadRequest)
		return
	}
	exp := p.now().Add(time.Duration(ttl) * time.Second).Unix()
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set(tokenTTLHeader, strconv.Itoa(ttl))
	_, _ = fmt.Fprint(w, metadataToken(r, exp))
}

// metadataToken is stateless, so tokens outlive a restart of the server:
// its expiry and a MAC of it under the instance's metadata key.
func metadataToken(r *record, exp int64) string {
	mac := hmac.New(sha256.New, []byte(r.MetadataKey))
	_, _ = fmt.Fprintf(mac, "imds-token\x00%s\x00%d", r.ID, exp)
	return strconv.FormatInt(exp, 10) + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

func (p *Provider) validToken(r *record, token string) bool {
	expStr, _, ok := strings.Cut(token, ".")
	exp, err := strconv.ParseInt(expStr, 10, 64)
	if !ok || err != nil || p.now().Unix() >= exp {
		return false
	}
	return hmac.Equal([]byte(token), []byte(metadataToken(r, exp)))
}

// recordByKey finds the live instance a metadata key belongs to, or nil.
func (p *Provider) recordByKey(key string) *record {
	if _, err := hex.DecodeString(key); err != nil || len(key) != 32 {
		return nil
	}
	p.mu.Lock()
	id, ok := p.keys[key]
	p.mu.Unlock()
	if !ok {
		// An instance launched by another process, or by us before a restart.
		recs, err := p.store.records(p.now(), 0)
		if err != nil {
			p.log.Warn("metadata service: listing instances", "err", err)
			return nil
		}
		keys := make(map[string]string, len(recs))
		for _, r := range recs {
			if r.MetadataKey != "" {
				keys[r.MetadataKey] = r.ID
			}
		}
		p.mu.Lock()
		p.keys = keys
		p.mu.Unlock()
		if id, ok = keys[key]; !ok {
			return nil
		}
	}
	r, err := p.store.getRecord(id)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			p.log.Warn("metadata service: reading instance", "id", id, "err", err)
		}
		return nil
	}
	if r.State == cloud.StateTerminated || subtle.ConstantTimeCompare([]byte(r.MetadataKey), []byte(key)) != 1 {
		return nil
	}
	return r
}
