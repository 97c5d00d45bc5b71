package local

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/hangar-ci/hangar/cloud/identity"
)

// The local cloud signs its instances' identity documents as EC2 does
// (cloud/identity), with a key of the tree's own, so that a pool with
// identity = "signed" runs its whole path here too.
//
//   - identity.key (RSA-2048, PKCS#1 PEM, 0600) is made on first use and
//     never replaced, so that every process of the tree signs alike and
//     documents stay valid across restarts. It is created by a link, which
//     fails if another process was first; the loser reads the winner's.
//   - identity.pem is its self-signed certificate, what Hangar is given to
//     verify with (Provider.IdentityCertificate).

// localAccountID is the account every local document names.
const localAccountID = "000000000000"

func (s *store) identityKeyPath() string  { return filepath.Join(s.dir, "identity.key") }
func (s *store) identityCertPath() string { return filepath.Join(s.dir, "identity.pem") }

// identityKey returns the tree's identity key and certificate, making them
// on first use.
func (s *store) identityKey() (*rsa.PrivateKey, []byte, error) {
	key, err := readIdentityKey(s.identityKeyPath())
	if errors.Is(err, fs.ErrNotExist) {
		key, err = s.createIdentityKey()
	}
	if err != nil {
		return nil, nil, err
	}
	certPEM, err := os.ReadFile(s.identityCertPath())
	if err == nil && certifies(certPEM, key) {
		return key, certPEM, nil
	}
	// Missing, or not of this key: made again. Two processes may both
	// write one; either certifies the same key.
	if certPEM, err = identity.SelfSigned(key, "hangar local cloud instance identity"); err != nil {
		return nil, nil, err
	}
	if err := writeFile(s.identityCertPath(), certPEM, 0o600); err != nil {
		return nil, nil, fmt.Errorf("saving identity certificate: %w", err)
	}
	return key, certPEM, nil
}

func readIdentityKey(path string) (*rsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading identity key: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "RSA PRIVATE KEY" {
		return nil, fmt.Errorf("reading identity key %s: not an RSA PRIVATE KEY PEM block", path)
	}
	key, err := x509.ParsePKCS1PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("reading identity key %s: %w", path, err)
	}
	return key, nil
}

// createIdentityKey makes the key and links it into place; if another
// process linked one first, that one is the tree's.
func (s *store) createIdentityKey() (*rsa.PrivateKey, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, fmt.Errorf("making identity key: %w", err)
	}
	b := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	tmp, err := os.CreateTemp(s.dir, ".identity.key.tmp-*")
	if err != nil {
		return nil, fmt.Errorf("making identity key: %w", err)
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	// CreateTemp makes it 0600.
	_, werr := tmp.Write(b)
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return nil, fmt.Errorf("saving identity key: %w", werr)
	}
	if err := os.Link(tmp.Name(), s.identityKeyPath()); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return readIdentityKey(s.identityKeyPath())
		}
		return nil, fmt.Errorf("saving identity key: %w", err)
	}
	return key, nil
}

// certifies reports whether certPEM is a certificate of key.
func certifies(certPEM []byte, key *rsa.PrivateKey) bool {
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return false
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return false
	}
	pub, ok := cert.PublicKey.(*rsa.PublicKey)
	return ok && pub.Equal(&key.PublicKey)
}

// signer returns the tree's identity key and certificate, cached once read.
func (p *Provider) signer() (*rsa.PrivateKey, []byte, error) {
	p.identityMu.Lock()
	defer p.identityMu.Unlock()
	if p.identityKey == nil {
		key, cert, err := p.store.identityKey()
		if err != nil {
			return nil, nil, err
		}
		p.identityKey, p.identityCert = key, cert
	}
	return p.identityKey, p.identityCert, nil
}

// IdentityCertificate returns the PEM certificate the tree's instance
// identity documents are signed under, for identity.FromPEM: a local pool's
// default identity_certificate. Nil if the key cannot be read or made (the
// error is logged).
func (p *Provider) IdentityCertificate() []byte {
	_, cert, err := p.signer()
	if err != nil {
		p.log.Error("local cloud: instance identity key", "err", err)
		return nil
	}
	return bytes.Clone(cert)
}

// identityDocument renders r's document as the metadata service serves it.
// The same record renders the same bytes, so a document and a signature
// fetched apart match.
func (p *Provider) identityDocument(r *record) ([]byte, error) {
	arch := runtime.GOARCH
	if arch == "amd64" {
		arch = "x86_64"
	}
	return identity.Document{
		AccountID:        localAccountID,
		Architecture:     arch,
		AvailabilityZone: r.Zone,
		ImageID:          r.Image,
		InstanceID:       r.ID,
		InstanceType:     r.Type,
		PendingTime:      r.LaunchedAt.UTC().Truncate(time.Second),
		PrivateIP:        r.PrivateIP,
		Region:           p.region,
		Version:          identity.DocumentVersion,
	}.Marshal()
}

// serveIdentity answers latest/dynamic/instance-identity/NAME for r.
func (p *Provider) serveIdentity(w http.ResponseWriter, req *http.Request, r *record, name string) {
	var body []byte
	var err error
	switch name {
	case "":
		body = []byte("document\nsignature\n")
	case "document":
		body, err = p.identityDocument(r)
	case "signature":
		var key *rsa.PrivateKey
		if key, _, err = p.signer(); err == nil {
			if body, err = p.identityDocument(r); err == nil {
				body, err = identity.Sign(key, body)
			}
		}
	default:
		http.NotFound(w, req)
		return
	}
	if err != nil {
		p.log.Error("metadata service: instance identity", "id", r.ID, "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	_, _ = w.Write(body)
}
