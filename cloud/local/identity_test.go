package local

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/identity"
)

// TestLaunchIndex: the instances of one launch are numbered 0..n-1 in the
// order of the launch's answer, and a replay of its client token (and a
// listing) gives each the same number.
func TestLaunchIndex(t *testing.T) {
	p := newTestProvider(t, Options{})
	spec := launchSpec("#!/bin/bash\ntrue\n", map[string]string{"test": t.Name()})
	first, err := p.Launch(t.Context(), spec, 3)
	if err != nil {
		t.Fatal(err)
	}
	replay, err := p.Launch(t.Context(), spec, 3)
	if err != nil {
		t.Fatal(err)
	}
	listed, err := p.List(t.Context(), map[string]string{"test": t.Name()})
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]cloud.Instance{}
	for _, in := range listed {
		byID[in.ID] = in
	}
	if len(first) != 3 || len(replay) != 3 || len(byID) != 3 {
		t.Fatalf("launched %d, replayed %d, listed %d; want 3 each", len(first), len(replay), len(byID))
	}
	for i, in := range first {
		if in.LaunchIndex != i {
			t.Errorf("instance %d of the launch has index %d", i, in.LaunchIndex)
		}
		if replay[i].ID != in.ID || replay[i].LaunchIndex != i {
			t.Errorf("replay: instance %d is %s with index %d; want %s with %d", i, replay[i].ID, replay[i].LaunchIndex, in.ID, i)
		}
		if got := byID[in.ID].LaunchIndex; got != i {
			t.Errorf("listed: %s has index %d, want %d", in.ID, got, i)
		}
	}
}

// imdsGet reads path (under latest/) of inst from the metadata service,
// with an IMDSv2 token unless noToken.
func imdsGet(t *testing.T, p *Provider, inst cloud.Instance, path string, noToken bool) (int, []byte) {
	t.Helper()
	r, err := p.store.getRecord(inst.ID)
	if err != nil {
		t.Fatal(err)
	}
	base := p.MetadataURL() + "/" + r.MetadataKey + "/latest/"
	do := func(req *http.Request) (int, []byte) {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, b
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, base+path, nil)
	if !noToken {
		treq, _ := http.NewRequestWithContext(t.Context(), http.MethodPut, base+"api/token", nil)
		treq.Header.Set(tokenTTLHeader, "60")
		code, tok := do(treq)
		if code != 200 {
			t.Fatalf("IMDSv2 token: %d %s", code, tok)
		}
		req.Header.Set(tokenHeader, string(tok))
	}
	return do(req)
}

// TestMetadataIdentitySigned: the metadata service serves each instance an
// EC2-shaped identity document and its signature, which verify under the
// provider's identity certificate, and under that of another process of the
// same tree; a document does not pass for another instance's.
func TestMetadataIdentitySigned(t *testing.T) {
	p := newTestProvider(t, Options{})
	spec := launchSpec("#!/bin/bash\ntrue\n", map[string]string{"test": t.Name()})
	spec.Image = "ami-0123"
	insts, err := p.Launch(t.Context(), spec, 2)
	if err != nil {
		t.Fatal(err)
	}
	v, err := identity.FromPEM(p.IdentityCertificate())
	if err != nil {
		t.Fatal(err)
	}
	docs := map[string][]byte{}
	for _, in := range insts {
		code, doc := imdsGet(t, p, in, "dynamic/instance-identity/document", false)
		scode, sig := imdsGet(t, p, in, "dynamic/instance-identity/signature", false)
		if code != 200 || scode != 200 {
			t.Fatalf("%s: document %d %s, signature %d %s", in.ID, code, doc, scode, sig)
		}
		d, err := v.Verify(p.Region(), doc, sig)
		if err != nil {
			t.Fatalf("%s: Verify: %v\n%s", in.ID, err, doc)
		}
		want := identity.Document{AccountID: "000000000000", AvailabilityZone: in.Zone, ImageID: spec.Image, InstanceID: in.ID,
			InstanceType: in.Type, PendingTime: in.LaunchedAt.UTC().Truncate(1e9), PrivateIP: in.PrivateIP, Region: "local",
			Version: "2017-09-30", Architecture: d.Architecture}
		if d != want || d.Architecture == "" {
			t.Errorf("%s: document %+v, want %+v", in.ID, d, want)
		}
		if _, err := v.Verify("us-east-1", doc, sig); err == nil {
			t.Errorf("%s: the document verified for another region", in.ID)
		}
		docs[in.ID] = doc
		if code, _ := imdsGet(t, p, in, "dynamic/instance-identity/document", true); code != 401 {
			t.Errorf("%s: document without an IMDSv2 token: %d, want 401", in.ID, code)
		}
	}
	_, sigB := imdsGet(t, p, insts[1], "dynamic/instance-identity/signature", false)
	if _, err := v.Verify(p.Region(), docs[insts[0].ID], sigB); err == nil {
		t.Errorf("one instance's signature verified another's document")
	}

	// The key is the tree's: 0600 next to metadata.secret, and another
	// process on the tree signs with it.
	fi, err := os.Stat(filepath.Join(p.opts.Dir, "identity.key"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("identity.key: %v, mode %v; want 0600", err, fi.Mode())
	}
	if _, err := os.Stat(filepath.Join(p.opts.Dir, "metadata.secret")); err != nil {
		t.Errorf("identity.key is not next to metadata.secret: %v", err)
	}
	other := newTestProvider(t, Options{Dir: p.opts.Dir})
	ov, err := identity.FromPEM(other.IdentityCertificate())
	if err != nil {
		t.Fatal(err)
	}
	_, sigA := imdsGet(t, p, insts[0], "dynamic/instance-identity/signature", false)
	if _, err := ov.Verify(p.Region(), docs[insts[0].ID], sigA); err != nil {
		t.Errorf("another process's certificate does not verify the tree's documents: %v", err)
	}
}

// TestIdentityKeyMadeOnce: processes that make the tree's key at once end up
// with one key.
func TestIdentityKeyMadeOnce(t *testing.T) {
	dir := t.TempDir()
	const n = 4
	keys := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		s, err := openStore(dir, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			key, cert, err := s.identityKey()
			if err != nil {
				t.Error(err)
				return
			}
			if !certifies(cert, key) {
				t.Errorf("store %d: the certificate is not of its key", i)
			}
			keys[i] = key.N.String()
		})
	}
	wg.Wait()
	for i := 1; i < n; i++ {
		if keys[i] != keys[0] {
			t.Errorf("store %d has a key of its own", i)
		}
	}
}
