// Package identity signs and verifies instance identity documents in the
// form EC2 serves them: the JSON document at
// latest/dynamic/instance-identity/document and, at …/signature, the
// base64 of an RSA PKCS#1 v1.5 signature of its bytes under SHA-256, made
// with the key of the region's published "RSA" certificate.
//
// Hangar uses it to check, before it enrolls an instance of a batched launch,
// that the instance id it is told is the id of the machine asking: a build
// that read the batch's user-data can learn a sibling's id, but cannot get
// the cloud to sign a document naming it. The local cloud signs its
// documents with a key of its own (SelfSigned makes its certificate), so
// that the same path runs in tests.
//
// Of EC2's three signatures this is the one the standard library checks
// alone: /pkcs7 is DSA over SHA-1 and /rsa2048 a PKCS#7 envelope, and
// neither crypto/dsa (deprecated) nor a PKCS#7 module is wanted here.
//
// AWS's certificates are not embedded: pass the region's RSA certificate,
// as published in the EC2 user guide ("AWS public certificates for instance
// identity document signatures"), to FromPEM.
package identity

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// DocumentVersion is the format of the documents EC2 serves.
const DocumentVersion = "2017-09-30"

// Document is the part of an instance identity document Hangar reads (the
// names are EC2's). Version and Architecture are written by Marshal, so
// that a document of the local cloud reads like one of EC2.
type Document struct {
	AccountID        string    `json:"accountId"`
	Architecture     string    `json:"architecture,omitempty"`
	AvailabilityZone string    `json:"availabilityZone"`
	ImageID          string    `json:"imageId"`
	InstanceID       string    `json:"instanceId"`
	InstanceType     string    `json:"instanceType"`
	PendingTime      time.Time `json:"pendingTime"`
	PrivateIP        string    `json:"privateIp"`
	Region           string    `json:"region"`
	Version          string    `json:"version,omitempty"`
}

// ErrInvalid is wrapped by every error of Verify: the document is not one
// the certificate's owner signed for that region.
var ErrInvalid = errors.New("instance identity not verified")

// Marshal renders d as EC2 serves a document: indented JSON.
func (d Document) Marshal() ([]byte, error) {
	b, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("rendering instance identity document: %w", err)
	}
	return b, nil
}

// Parse reads a document. It checks only that the instance id and region
// are there; it proves nothing (see Verifier.Verify).
func Parse(doc []byte) (Document, error) {
	var d Document
	if err := json.Unmarshal(doc, &d); err != nil {
		return Document{}, fmt.Errorf("parsing instance identity document: %w", err)
	}
	if d.InstanceID == "" || d.Region == "" {
		return Document{}, errors.New("parsing instance identity document: no instanceId or region")
	}
	return d, nil
}

// Sign returns what EC2's …/signature serves for doc: base64 of the RSA
// PKCS#1 v1.5 signature of SHA-256(doc).
func Sign(key *rsa.PrivateKey, doc []byte) ([]byte, error) {
	sum := sha256.Sum256(doc)
	sig, err := rsa.SignPKCS1v15(nil, key, crypto.SHA256, sum[:])
	if err != nil {
		return nil, fmt.Errorf("signing instance identity document: %w", err)
	}
	out := make([]byte, base64.StdEncoding.EncodedLen(len(sig)))
	base64.StdEncoding.Encode(out, sig)
	return out, nil
}

// SelfSigned returns a PEM certificate for key, named cn, as a cloud that
// signs identity documents publishes it. It is valid for a hundred years:
// Verify pins the key and ignores validity dates, as EC2's certificates
// are used past the dates they carry.
func SelfSigned(key *rsa.PrivateKey, cn string) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, fmt.Errorf("making identity certificate: %w", err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(100, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("making identity certificate: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// Verifier checks documents against pinned RSA keys.
type Verifier struct {
	keys []*rsa.PublicKey
}

// FromPEM makes a Verifier from one or more PEM certificates (several: a
// rotation, where documents signed under either key are taken). Only the
// certificates' RSA keys count: no chain is built, and dates are ignored.
func FromPEM(b []byte) (*Verifier, error) {
	v := &Verifier{}
	rest := bytes.TrimSpace(b)
	for len(rest) > 0 {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, errors.New("reading identity certificate: not PEM, or text after the last certificate")
		}
		rest = bytes.TrimSpace(rest)
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("reading identity certificate: a %q block, want CERTIFICATE", block.Type)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("reading identity certificate: %w", err)
		}
		pub, ok := cert.PublicKey.(*rsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("reading identity certificate %q: its key is not RSA (the DSA certificates are for /pkcs7; use the RSA one)", cert.Subject.CommonName)
		}
		v.keys = append(v.keys, pub)
	}
	if len(v.keys) == 0 {
		return nil, errors.New("reading identity certificate: no certificate")
	}
	return v, nil
}

// Verify checks that sig (base64, as …/signature serves it; white space is
// ignored) is a signature of doc under one of the verifier's keys, and that
// the document is of region. It returns the document, which may then be
// believed. Every error wraps ErrInvalid.
func (v *Verifier) Verify(region string, doc, sig []byte) (Document, error) {
	raw, err := base64.StdEncoding.DecodeString(string(bytes.Join(bytes.Fields(sig), nil)))
	if err != nil {
		return Document{}, fmt.Errorf("%w: the signature is not base64", ErrInvalid)
	}
	sum := sha256.Sum256(doc)
	signed := false
	for _, k := range v.keys {
		if rsa.VerifyPKCS1v15(k, crypto.SHA256, sum[:], raw) == nil {
			signed = true
			break
		}
	}
	if !signed {
		return Document{}, fmt.Errorf("%w: the signature does not match the document under the identity certificate", ErrInvalid)
	}
	d, err := Parse(doc)
	if err != nil {
		return Document{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if d.Region != region {
		return Document{}, fmt.Errorf("%w: the document is of region %q, not %q", ErrInvalid, d.Region, region)
	}
	return d, nil
}
