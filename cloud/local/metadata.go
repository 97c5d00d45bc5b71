package local

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// The metadata service speaks the EC2 IMDSv2 paths under a per-instance
// prefix: http://127.0.0.1:PORT/<metadata key>/latest/… . The key tells the
// instance apart (all instances share the loopback interface) and keeps other
// local users from reading an instance's user-data.

const (
	tokenTTLHeader = "X-aws-ec2-metadata-token-ttl-seconds"
	tokenHeader    = "X-aws-ec2-metadata-token"
	maxTokenTTL    = 21600
)

// listenMetadata listens on addr; with port 0 it first tries the port of the
// last run, which instances still running have in their environment.
func (p *Provider) listenMetadata(addr string) (net.Listener, error) {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("parsing metadata address: %w", err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return nil, fmt.Errorf("metadata service must listen on a loopback IP address, got %q", addr)
	}
	saved := filepath.Join(p.store.dir, "metadata.addr")
	var ln net.Listener
	if port == "0" {
		if b, err := os.ReadFile(saved); err == nil {
			if _, oldPort, err := net.SplitHostPort(strings.TrimSpace(string(b))); err == nil {
				ln, err = net.Listen("tcp", net.JoinHostPort(host, oldPort))
				if err != nil {
					p.log.Warn("metadata service moved to a new port; running instances keep the old URL until restarted",
						"old_port", oldPort, "err", err)
				}
			}
		}
	}
	if ln == nil {
		if ln, err = net.Listen("tcp", addr); err != nil {
			return nil, fmt.Errorf("starting metadata service: %w", err)
		}
	}
	if err := writeFile(saved, []byte(ln.Addr().String()+"\n"), 0o600); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("saving metadata address: %w", err)
	}
	return ln, nil
}

func (p *Provider) serveMetadata(w http.ResponseWriter, req *http.Request) {
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
