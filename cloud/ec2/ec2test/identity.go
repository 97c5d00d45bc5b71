package ec2test

import (
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"time"

	"github.com/hangar-ci/hangar/cloud/identity"
)

// Instance identity documents, as EC2's metadata service serves them to
// an instance and signs them (cloud/identity): the server's in-memory
// instances have no metadata service, so a test that plays their boot
// (a benchmark enrolling a batch) asks the server for what the instance
// would read. The key is Options.IdentityKey, or one made on first use.

// identityKey returns the signing key and its certificate, making them on
// first use: an RSA key takes a moment, which a server that never signs
// should not spend.
func (s *Server) identityKey() (*rsa.PrivateKey, []byte, error) {
	s.identityMu.Lock()
	defer s.identityMu.Unlock()
	if s.idCert != nil {
		return s.idKey, s.idCert, nil
	}
	key := s.opts.IdentityKey
	if key == nil {
		var err error
		if key, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			return nil, nil, fmt.Errorf("ec2test: making the identity key: %w", err)
		}
	}
	cert, err := identity.SelfSigned(key, "ec2test instance identity")
	if err != nil {
		return nil, nil, err
	}
	s.idKey, s.idCert = key, cert
	return key, cert, nil
}

// IdentityCertificate is the PEM certificate the server's identity
// documents verify with (identity.FromPEM), as AWS publishes one per
// region; one serves every region of the server.
func (s *Server) IdentityCertificate() ([]byte, error) {
	_, cert, err := s.identityKey()
	return cert, err
}

// IdentityDocument returns what instance id of the default region would
// read at latest/dynamic/instance-identity/document and …/signature:
// the JSON document and its base64 signature. Hidden instances (HideNewFor)
// have theirs: an instance knows itself before the API lists it.
func (s *Server) IdentityDocument(id string) (doc, sig []byte, err error) {
	return s.Region("").IdentityDocument(id)
}

// IdentityDocument is Server.IdentityDocument for an instance of r.
func (r *Region) IdentityDocument(id string) (doc, sig []byte, err error) {
	key, _, err := r.s.identityKey()
	if err != nil {
		return nil, nil, err
	}
	r.s.mu.Lock()
	in, ok := r.rg.instances[id]
	var d identity.Document
	if ok {
		d = identity.Document{
			AccountID: r.s.opts.Account, Architecture: "x86_64", AvailabilityZone: in.zone,
			ImageID: in.image, InstanceID: in.id, InstanceType: in.typ,
			PendingTime: in.launched.UTC().Truncate(time.Second), PrivateIP: in.ip,
			Region: r.rg.name, Version: identity.DocumentVersion,
		}
	}
	r.s.mu.Unlock()
	if !ok {
		return nil, nil, fmt.Errorf("ec2test: no instance %s in %s", id, r.rg.name)
	}
	if doc, err = d.Marshal(); err != nil {
		return nil, nil, err
	}
	if sig, err = identity.Sign(key, doc); err != nil {
		return nil, nil, err
	}
	return doc, sig, nil
}
