package ec2

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/hangar-ci/hangar/cloud"
)

// A pool's image is one of:
//
//	ami-0123456789abcdef0           an image id, used as is
//	hangar-ci-*                     a name pattern over the account's own images
//	OWNERS:NAME-PATTERN             a name pattern over the images of OWNERS
//
// OWNERS is a comma-separated list of what DescribeImages takes as owners:
// account ids, "self", "amazon", "aws-marketplace"; for example
// "amazon:al2023-ami-2023.*-x86_64" or "099720109477:ubuntu/images/*24.04*".
// Patterns use EC2's wildcards: * for any run of characters, ? for one.
// AMI names cannot contain a colon, so the first colon always ends OWNERS.
//
// Without OWNERS only the account's own images match: anyone can publish a
// public image under any name, so matching public images by name alone
// would let a stranger choose what Hangar boots.
//
// A pattern resolves to the newest available matching image, by creation
// date, and the answer is cached (DescribeImages is large and slow).

// imageRef is a parsed image reference: an id, or owners and a pattern.
type imageRef struct {
	id      string
	owners  []string
	pattern string
}

func parseImage(s string) (imageRef, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return imageRef{}, errors.New("no image given")
	}
	if strings.HasPrefix(s, "ami-") && !strings.ContainsAny(s, "*?:") {
		return imageRef{id: s}, nil
	}
	owners, pattern, ok := strings.Cut(s, ":")
	if !ok {
		return imageRef{owners: []string{"self"}, pattern: s}, nil
	}
	ref := imageRef{pattern: pattern}
	for o := range strings.SplitSeq(owners, ",") {
		if o = strings.TrimSpace(o); o != "" {
			ref.owners = append(ref.owners, o)
		}
	}
	if len(ref.owners) == 0 || pattern == "" {
		return imageRef{}, fmt.Errorf("image %q: want OWNERS:NAME-PATTERN", s)
	}
	return ref, nil
}

// image is what a launch needs to know of an image.
type image struct {
	ID         string
	RootDevice string // e.g. /dev/xvda; needed to resize the root volume
}

// imageCache resolves image references, each at most once per TTL however
// many launches ask at the same moment.
type imageCache struct {
	api ec2.DescribeImagesAPIClient
	ttl time.Duration
	now func() time.Time

	mu      sync.Mutex
	entries map[string]*imageEntry
}

type imageEntry struct {
	done    chan struct{} // closed once img, err and expires are set
	img     image
	err     error
	expires time.Time
}

func newImageCache(api ec2.DescribeImagesAPIClient, ttl time.Duration, now func() time.Time) *imageCache {
	return &imageCache{api: api, ttl: ttl, now: now, entries: map[string]*imageEntry{}}
}

// resolve returns the image ref names. An id needs no request unless the
// caller needs its root device name.
func (c *imageCache) resolve(ctx context.Context, ref string, needRootDevice bool) (image, error) {
	r, err := parseImage(ref)
	if err != nil {
		return image{}, fmt.Errorf("resolving image: %w", err)
	}
	if r.id != "" && !needRootDevice {
		return image{ID: r.id}, nil
	}
	for {
		c.mu.Lock()
		e := c.entries[ref]
		if e == nil || e.stale(c.now()) {
			e = &imageEntry{done: make(chan struct{})}
			c.entries[ref] = e
			c.mu.Unlock()
			e.img, e.err = c.lookup(ctx, ref, r)
			e.expires = c.now().Add(c.ttl)
			close(e.done)
			return e.img, e.err
		}
		c.mu.Unlock()
		select {
		case <-e.done:
			if e.err == nil {
				return e.img, nil
			}
			// The lookup this call waited for failed, perhaps only because
			// its caller gave up: look again under this call's context.
		case <-ctx.Done():
			return image{}, fmt.Errorf("resolving image %q: %w", ref, ctx.Err())
		}
	}
}

// stale reports whether an entry must be looked up again: it failed, or
// its time is up. One still in flight is not stale.
func (e *imageEntry) stale(now time.Time) bool {
	select {
	case <-e.done:
		return e.err != nil || !now.Before(e.expires)
	default:
		return false
	}
}

func (c *imageCache) lookup(ctx context.Context, ref string, r imageRef) (image, error) {
	doing := fmt.Sprintf("resolving image %q", ref)
	if r.id != "" {
		out, err := c.api.DescribeImages(ctx, &ec2.DescribeImagesInput{ImageIds: []string{r.id}})
		if err != nil {
			return image{}, wrapErr(doing, err)
		}
		if len(out.Images) == 0 {
			return image{}, fmt.Errorf("%s: %w", doing, cloud.ErrNotFound)
		}
		return toImage(out.Images[0]), nil
	}
	pages := ec2.NewDescribeImagesPaginator(c.api, &ec2.DescribeImagesInput{
		Owners: r.owners,
		Filters: []types.Filter{
			{Name: aws.String("name"), Values: []string{r.pattern}},
			{Name: aws.String("state"), Values: []string{"available"}},
		},
		// No MaxResults: not every EC2-compatible cloud pages images, and
		// owners and a name filter keep the answer small. The paginator
		// still follows a NextToken if one comes.
	})
	var newest *types.Image
	for pages.HasMorePages() {
		page, err := pages.NextPage(ctx)
		if err != nil {
			return image{}, wrapErr(doing, err)
		}
		for i := range page.Images {
			if newer(&page.Images[i], newest) {
				newest = &page.Images[i]
			}
		}
	}
	if newest == nil {
		return image{}, fmt.Errorf("%s: no available image of owners %s matches: %w", doing, strings.Join(r.owners, ","), cloud.ErrNotFound)
	}
	return toImage(*newest), nil
}

// newer reports whether a was created after b, breaking ties by name and
// id so that the choice does not depend on EC2's order.
func newer(a, b *types.Image) bool {
	if b == nil {
		return true
	}
	ta, errA := time.Parse(time.RFC3339Nano, aws.ToString(a.CreationDate))
	tb, errB := time.Parse(time.RFC3339Nano, aws.ToString(b.CreationDate))
	c := 0
	if errA == nil && errB == nil {
		c = ta.Compare(tb)
	} else {
		c = cmp.Compare(aws.ToString(a.CreationDate), aws.ToString(b.CreationDate))
	}
	if c == 0 {
		c = cmp.Or(cmp.Compare(aws.ToString(a.Name), aws.ToString(b.Name)), cmp.Compare(aws.ToString(a.ImageId), aws.ToString(b.ImageId)))
	}
	return c > 0
}

func toImage(im types.Image) image {
	return image{ID: aws.ToString(im.ImageId), RootDevice: aws.ToString(im.RootDeviceName)}
}
