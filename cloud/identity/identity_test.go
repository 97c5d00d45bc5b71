package identity

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	keysOnce sync.Once
	keyA     *rsa.PrivateKey
	keyB     *rsa.PrivateKey
)

// testKeys are made once: RSA key generation is slow.
func testKeys(t *testing.T) (*rsa.PrivateKey, *rsa.PrivateKey) {
	t.Helper()
	keysOnce.Do(func() {
		var err error
		if keyA, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
		if keyB, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
	})
	return keyA, keyB
}

func verifier(t *testing.T, keys ...*rsa.PrivateKey) *Verifier {
	t.Helper()
	var bundle []byte
	for i, k := range keys {
		pem, err := SelfSigned(k, "test "+string(rune('a'+i)))
		if err != nil {
			t.Fatal(err)
		}
		bundle = append(bundle, pem...)
	}
	v, err := FromPEM(bundle)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func sign(t *testing.T, key *rsa.PrivateKey, doc []byte) []byte {
	t.Helper()
	sig, err := Sign(key, doc)
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

// TestVerify: a document verifies only unchanged, under the certificate of
// the key that signed it, and for its own region.
func TestVerify(t *testing.T) {
	a, b := testKeys(t)
	want := Document{AccountID: "000000000000", AvailabilityZone: "local-1a", ImageID: "ami-0123456789abcdef0",
		InstanceID: "i-0123456789abcdef0", InstanceType: "t3.micro", PendingTime: time.Date(2026, 12, 3, 13, 0, 0, 0, time.UTC),
		PrivateIP: "127.0.0.9", Region: "local", Version: "2017-09-30", Architecture: "x86_64"}
	doc, err := want.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	sig := sign(t, a, doc)
	tampered := bytes.Replace(doc, []byte("i-0123456789abcdef0"), []byte("i-0123456789abcdef1"), 1)
	notJSON := []byte("i-0123456789abcdef0")
	noRegion := []byte(`{"instanceId": "i-0123456789abcdef0"}`)
	wrapped := []byte(string(sig[:64]) + "\n" + string(sig[64:]) + "\n")
	for _, c := range []struct {
		name     string
		v        *Verifier
		region   string
		doc, sig []byte
		err      string // "" for none
	}{
		{"valid", verifier(t, a), "local", doc, sig, ""},
		{"valid, signature in lines", verifier(t, a), "local", doc, wrapped, ""},
		{"valid under the second of two certificates", verifier(t, b, a), "local", doc, sig, ""},
		{"tampered document", verifier(t, a), "local", tampered, sig, "does not match"},
		{"wrong key", verifier(t, b), "local", doc, sig, "does not match"},
		{"wrong region", verifier(t, a), "us-east-1", doc, sig, `of region "local", not "us-east-1"`},
		{"signature not base64", verifier(t, a), "local", doc, []byte("not base64!"), "not base64"},
		{"no signature", verifier(t, a), "local", doc, nil, "does not match"},
		{"signed, but not a document", verifier(t, a), "local", notJSON, sign(t, a, notJSON), "parsing"},
		{"signed, without a region", verifier(t, a), "local", noRegion, sign(t, a, noRegion), "no instanceId or region"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := c.v.Verify(c.region, c.doc, c.sig)
			if c.err == "" {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				if got != want {
					t.Errorf("document %+v, want %+v", got, want)
				}
				return
			}
			if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.err) {
				t.Errorf("Verify error %v; want ErrInvalid saying %q", err, c.err)
			}
			if got != (Document{}) {
				t.Errorf("a document came with the error: %+v", got)
			}
		})
	}
}

// TestSignIsEC2Form: the signature is standard base64 of a PKCS#1 v1.5
// SHA-256 signature (what openssl dgst -sha256 -verify takes, AWS's
// procedure), so 256 bytes for an RSA-2048 key.
func TestSignIsEC2Form(t *testing.T) {
	a, _ := testKeys(t)
	sig := sign(t, a, []byte("{}"))
	if len(sig) != 344 || !bytes.HasSuffix(sig, []byte("=")) {
		t.Errorf("signature %q is not the base64 of 256 bytes", sig)
	}
}

func TestFromPEMRefuses(t *testing.T) {
	a, _ := testKeys(t)
	good, err := SelfSigned(a, "good")
	if err != nil {
		t.Fatal(err)
	}
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ec"}, NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &ec.PublicKey, ec)
	if err != nil {
		t.Fatal(err)
	}
	ecPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	for _, c := range []struct {
		name string
		pem  []byte
		err  string
	}{
		{"empty", nil, "no certificate"},
		{"not PEM", []byte("hello"), "not PEM"},
		{"junk after", append(append([]byte{}, good...), "junk"...), "not PEM"},
		{"a key", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(a)}), `"RSA PRIVATE KEY" block`},
		{"not a certificate", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("x")}), "reading identity certificate"},
		{"not RSA", ecPEM, "not RSA"},
	} {
		if _, err := FromPEM(c.pem); err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: FromPEM error %v, want one saying %q", c.name, err, c.err)
		}
	}
}
