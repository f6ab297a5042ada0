"""Synthetic phone-GUI grounding users, written in the per-user pickle format the trainer reads.

Each user is a file `user_{id}.pkl`: a list of samples, each a [system, assistant] message pair
whose system turn holds a screenshot path (relative to the output folder) and the grounding prompt,
and whose assistant turn names the element and gives its centre in relative 0-1000 coordinates.

About half of the users have personal habits that only their own data reveals: private words for
icons ("the usual" means the search icon to one user and the gear to another), two or three
favourite apps that fill most of their screens, and a favourite screen region that settles which of
two identical icons an ambiguous command means. The other users speak plainly and use every app
alike. That split is what lets per-user fine-tuning show a gain over one global model.

Everything is drawn with PIL and seeded per user from `seed`, so the same arguments always give
byte-identical pickles and PNGs.
"""
import functools
import json
import math
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pigg.grounding.prompts import make_prompt


def format_answer(referring: str, x: int, y: int) -> str:
    return f"```referring\n{referring}\n```\n```grounding\n[{x}, {y}]\n```"


# ---------------------------------------------------------------------------------------------
# What screens are made of
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class App:
    name: str
    accent: tuple
    rows: tuple  # labels for list rows and grid tiles
    buttons: tuple  # (label, what a user would say instead of the label)
    new_thing: str  # what the plus icon creates here: "add a new {new_thing}"


# Button phrases are kept clear of the icon phrases below so that a plain command never fits two
# elements on one screen.
APPS = (
    App("Messages", (46, 125, 50),
        ("Alice", "Bob", "Carol", "Dad", "Mom", "Team chat", "Work group", "Neighbours"),
        (("Send", "send the message"), ("New chat", "start a new chat"), ("Archive", "archive this chat"),
         ("Mark as read", "mark everything as read"), ("Mute", "mute this conversation")), "contact"),
    App("Maps", (25, 118, 210),
        ("Saved places", "Recent", "Coffee shops", "Gas stations", "Parking", "Restaurants", "Hotels", "Transit"),
        (("Directions", "get directions"), ("Start", "start navigation"), ("Save place", "save this place"),
         ("Share location", "share my location"), ("Nearby", "show what's nearby")), "stop"),
    App("Shop", (230, 81, 0),
        ("Shoes", "Jackets", "Books", "Toys", "Kitchen", "Garden", "Sports", "Beauty"),
        (("Add to cart", "add this item to my cart"), ("Buy now", "buy it now"), ("Checkout", "go to checkout"),
         ("Track order", "track my order"), ("Apply coupon", "use a coupon")), "wishlist"),
    App("Settings", (84, 110, 122),
        ("Wi-Fi", "Bluetooth", "Display", "Sound", "Battery", "Privacy", "Storage", "Accounts"),
        (("Save", "save the changes"), ("Reset", "reset everything"), ("Sign out", "log out"),
         ("Update", "install the update"), ("Back up now", "back up my phone")), "network"),
    App("Music", (216, 27, 96),
        ("Liked songs", "Chill mix", "Road trip", "Podcasts", "Jazz", "Top hits", "Workout", "Classical"),
        (("Shuffle", "shuffle the songs"), ("Repeat", "turn on repeat"), ("Download", "download this album"),
         ("Follow", "follow this artist"), ("Queue", "show the queue")), "playlist"),
    App("Camera", (55, 71, 79),
        ("Photo", "Video", "Portrait", "Panorama", "Night", "Slow-mo", "Time-lapse", "Pro"),
        (("Flash", "toggle the flash"), ("Timer", "set a timer"), ("HDR", "switch HDR"),
         ("Gallery", "open my photos"), ("Flip", "switch to the front camera")), "album"),
    App("Mail", (198, 40, 40),
        ("Inbox", "Sent", "Drafts", "Spam", "Trash", "Starred", "Important", "Newsletters"),
        (("Reply", "reply to this email"), ("Forward", "forward this email"), ("Compose", "write an email"),
         ("Delete", "delete this email"), ("Mark unread", "mark it as unread")), "folder"),
    App("Calendar", (57, 73, 171),
        ("Today", "Tomorrow", "This week", "Birthdays", "Holidays", "Meetings", "Reminders", "Travel"),
        (("Invite", "invite someone"), ("Accept", "accept the invitation"), ("Decline", "decline the invitation"),
         ("Reschedule", "move this meeting"), ("Month view", "show the whole month")), "event"),
    App("Bank", (0, 105, 92),
        ("Checking", "Savings", "Credit card", "Loans", "Statements", "Cards", "Investments", "Rewards"),
        (("Transfer", "send money"), ("Pay bills", "pay my bills"), ("Deposit", "deposit a check"),
         ("Freeze card", "freeze my card"), ("Exchange", "exchange currency")), "payee"),
    App("Weather", (2, 136, 209),
        ("London", "Paris", "Tokyo", "New York", "Sydney", "Berlin", "Toronto", "Madrid"),
        (("Refresh", "refresh the forecast"), ("Hourly", "show the hourly forecast"),
         ("10-day", "show the 10-day forecast"), ("Radar", "open the radar"), ("Alerts", "show weather alerts")),
        "city"),
)
APP_NAMES = tuple(app.name for app in APPS)

ICON_COLOURS = {
    "blue": (30, 100, 230), "red": (215, 40, 40), "green": (30, 150, 60), "orange": (240, 135, 0),
    "purple": (135, 60, 195), "grey": (105, 105, 105), "pink": (225, 55, 145), "teal": (0, 140, 140),
}
# What people call an icon instead of naming its shape; shapes without an obvious meaning
# (triangle, square, circle) are only ever referred to by looks.
ICON_PHRASES = {
    "plus": ("add a new {thing}", "create a new {thing}"),
    "star": ("mark this as a favourite", "star it"),
    "gear": ("open settings", "open the settings"),
    "search": ("open search", "search for something"),
    "heart": ("like this", "add this to my likes"),
    "menu": ("open the menu", "show the menu"),
    "bell": ("show my notifications", "check notifications"),
    "home": ("go to the home screen", "go home"),
}
TITLE_KINDS = ("search", "gear", "menu", "bell", "star", "heart", "plus")
NAV_KINDS = ("home", "search", "star", "heart", "bell", "gear", "menu", "plus", "circle", "square", "triangle")
TOOLBAR_KINDS = ("triangle", "square", "circle", "star", "heart", "plus", "search", "bell")
TEXT_KINDS = ("row", "tile", "button")

# Habit users' private words all draw on these few, and each user maps them to different icons,
# so a model trained on everyone cannot tell what "the usual" means.
ALIAS_WORDS = ("the usual", "my button", "the thing", "that one")
ALIAS_KINDS = ("search", "gear", "plus", "star", "heart", "bell", "home", "menu")
REGIONS = ("top bar", "bottom bar", "toolbar", "floating")
FAVOURITE_SHARE = 0.7


@dataclass
class Element:
    kind: str  # "row", "tile", "button", or an icon shape ("plus", "star", ...)
    box: tuple  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive
    region: str  # "content", "toolbar", "top bar", "bottom bar" or "floating"
    label: str = ""  # text elements only
    phrase: str = ""  # buttons only
    colour: str = ""  # icons only
    description: str = ""  # canonical referring text, set by name_elements()

    @property
    def is_icon(self) -> bool:
        return self.kind not in TEXT_KINDS

    @property
    def centre(self) -> tuple:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Screen:
    app: App
    width: int
    height: int
    has_nav: bool
    elements: list


@dataclass(frozen=True)
class Frame:
    """Bar heights and spacing, all proportional to the screen so any size looks alike."""
    status: int
    title: int
    nav: int
    margin: int
    gap: int

    @staticmethod
    def of(width: int, height: int) -> "Frame":
        return Frame(status=round(0.03 * height), title=round(0.07 * height), nav=round(0.08 * height),
                     margin=round(0.045 * width), gap=max(2, round(0.012 * height)))


# ---------------------------------------------------------------------------------------------
# Building a screen: choose elements, place them, name them
# ---------------------------------------------------------------------------------------------

def build_screen(rng: random.Random, app: App, width: int, height: int, must_have: str | None = None) -> Screen:
    """A random screen of `app` with 5-12 non-overlapping elements; `must_have` forces an icon kind."""
    frame = Frame.of(width, height)
    title_kinds = rng.sample(TITLE_KINDS, rng.randint(1, 2))
    nav_kinds = rng.sample(NAV_KINDS, rng.randint(3, 5)) if rng.random() < 0.6 else []
    fab_kind = ""
    if rng.random() < 0.35:
        fab_kind = "plus" if rng.random() < 0.7 else rng.choice(("star", "heart", "search"))
    if must_have:
        _insert_kind(rng, must_have, [k for k in (title_kinds, nav_kinds) if k])
    n_fixed = len(title_kinds) + len(nav_kinds) + bool(fab_kind)
    n_content = max(3, 5 - n_fixed, rng.randint(5, 12) - n_fixed)

    elements = _title_icons(rng, title_kinds, frame, width)
    content_bottom = height - (frame.nav if nav_kinds else 0) - frame.gap
    if nav_kinds:
        elements += _nav_icons(rng, nav_kinds, frame, width, height)
    if fab_kind:
        fab = _fab(rng, fab_kind, frame, width, content_bottom)
        elements.append(fab)
        content_bottom = fab.box[1] - frame.gap
    lines = _content_lines(rng, app, n_content)
    elements += _place_lines(rng, lines, frame, width, height, frame.status + frame.title + frame.gap, content_bottom)
    if not 5 <= len(elements) <= 12:
        raise ValueError(f"{app.name} screen at {width}x{height} got {len(elements)} elements, expected 5-12")
    name_elements(elements)
    return Screen(app, width, height, bool(nav_kinds), elements)


def _insert_kind(rng, kind, kind_lists):
    if any(kind in kinds for kinds in kind_lists):
        return
    kinds = rng.choice(kind_lists)
    kinds[rng.randrange(len(kinds))] = kind


def _icon(rng, kind, box, region) -> Element:
    return Element(kind, box, region, colour=rng.choice(tuple(ICON_COLOURS)))


def _title_icons(rng, kinds, frame, width):
    size = round(frame.title * 0.8)
    y0 = frame.status + (frame.title - size) // 2
    x1s = [width - frame.margin // 2 - i * (size + frame.gap) for i in range(len(kinds))]
    return [_icon(rng, k, (x1 - size, y0, x1, y0 + size), "top bar") for k, x1 in zip(kinds, x1s)]


def _nav_icons(rng, kinds, frame, width, height):
    size = round(frame.nav * 0.8)
    cell = width / len(kinds)
    y0 = height - frame.nav + (frame.nav - size) // 2
    x0s = [round(cell * (i + 0.5)) - size // 2 for i in range(len(kinds))]
    return [_icon(rng, k, (x0, y0, x0 + size, y0 + size), "bottom bar") for k, x0 in zip(kinds, x0s)]


def _fab(rng, kind, frame, width, bottom):
    size = round(frame.nav * 0.9)
    x1 = width - frame.margin
    return _icon(rng, kind, (x1 - size, bottom - size, x1, bottom), "floating")


def _content_lines(rng, app, n):
    """`n` content elements as horizontal lines: ("row", [label]), ("buttons", [(label, phrase), ...]),
    ("tiles", [label, ...]) or ("toolbar", [icon kind, ...])."""
    layout = rng.choice(("list", "grid", "buttons"))
    buttons = rng.sample(app.buttons, len(app.buttons))
    labels = rng.sample(app.rows, len(app.rows))
    lines = []
    if layout == "buttons":
        n_tools = min(n - 1, rng.randint(3, 4))
        lines.append(("toolbar", rng.sample(TOOLBAR_KINDS, n_tools)))
        n_buttons = min(n - n_tools, len(buttons))
        lines += [("buttons", [b]) for b in buttons[:n_buttons]]
        lines += [("row", [label]) for label in labels[:n - n_tools - n_buttons]]
        return lines
    n_buttons = max(n - len(labels), rng.randint(0, 2) if n >= 5 else 0)
    n_text = n - n_buttons
    if layout == "list":
        lines += [("row", [label]) for label in labels[:n_text]]
    else:
        cols = rng.choice((2, 3))
        lines += [("tiles", labels[i:min(i + cols, n_text)]) for i in range(0, n_text, cols)]
    lines += [("buttons", buttons[i:min(i + 2, n_buttons)]) for i in range(0, n_buttons, 2)]
    return lines


LINE_HEIGHT = {"row": 0.066, "buttons": 0.06, "tiles": 0.11, "toolbar": 0.065}  # fractions of screen height


def _place_lines(rng, lines, frame, width, height, top, bottom):
    """Stack lines downwards from `top`; a line that would pass `bottom` is dropped, with all after it."""
    heights = [round(LINE_HEIGHT[kind] * height) for kind, _ in lines]
    n_fit, used = 0, 0
    while n_fit < len(lines) and used + heights[n_fit] <= bottom - top:
        used += heights[n_fit] + frame.gap
        n_fit += 1
    # Real apps put content under headers, cards and maps; dropping it a random amount spreads
    # targets over the whole height instead of always near the top.
    y = top + rng.randint(0, max(0, bottom - top - used) // 2)
    elements = []
    for (kind, items), h in zip(lines[:n_fit], heights):
        elements += _place_line(rng, kind, items, frame, width, y, h)
        y += h + frame.gap
    return elements


def _place_line(rng, kind, items, frame, width, y, h):
    cell = (width - 2 * frame.margin - (len(items) - 1) * frame.gap) / len(items)
    x0s = [round(frame.margin + i * (cell + frame.gap)) for i in range(len(items))]
    cells = [(x0, y, x0 + int(cell), y + h) for x0 in x0s]
    if kind == "toolbar":
        return [_icon(rng, k, ((x0 + x1 - h) // 2, y0, (x0 + x1 - h) // 2 + h, y1), "toolbar")
                for k, (x0, y0, x1, y1) in zip(items, cells)]
    if kind == "buttons":
        return [Element("button", box, "content", label=label, phrase=phrase)
                for (label, phrase), box in zip(items, cells)]
    kind = "tile" if kind == "tiles" else "row"
    return [Element(kind, box, "content", label=label) for label, box in zip(items, cells)]


def name_elements(elements: list) -> None:
    """Give each element its canonical referring text: the shortest description unique on the screen."""
    for e in elements:
        if not e.is_icon:
            e.description = f"{e.label} {e.kind}"
            continue
        twins = [o for o in elements if o is not e and o.kind == e.kind]
        if e.region == "floating":
            e.description = f"{e.colour} {e.kind} button"
        elif not twins:
            e.description = f"{e.kind} icon"
        elif all(o.colour != e.colour for o in twins):
            e.description = f"{e.colour} {e.kind} icon"
        else:
            e.description = f"{e.colour} {e.kind} icon in {e.region}"


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _font(size: int):
    # Pillow's bundled font (a scalable one when FreeType is present), never a system TTF, so every
    # machine draws the same pixels.
    return ImageFont.load_default(size=size)


def render(screen: Screen) -> Image.Image:
    img = Image.new("RGB", (screen.width, screen.height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _draw_chrome(draw, screen, Frame.of(screen.width, screen.height))
    for e in screen.elements:
        _draw_element(draw, e, screen)
    return img


def _draw_chrome(draw, screen, frame):
    w, h, accent = screen.width, screen.height, screen.app.accent
    draw.rectangle((0, 0, w - 1, frame.status - 1), fill=accent)
    _text(draw, (frame.margin, frame.status // 2), "9:41", max(8, frame.status * 2 // 3), (255, 255, 255), w, "left")
    bw, bh = frame.status, frame.status // 2
    draw.rectangle((w - frame.margin - bw, bh // 2, w - frame.margin, bh // 2 + bh), outline=(255, 255, 255), width=1)
    draw.rectangle((0, frame.status, w - 1, frame.status + frame.title - 1), fill=(248, 248, 248))
    draw.line((0, frame.status + frame.title - 1, w, frame.status + frame.title - 1), fill=accent, width=2)
    _text(draw, (frame.margin, frame.status + frame.title // 2), screen.app.name, round(frame.title * 0.38),
          (25, 25, 25), w // 2, "left")
    if screen.has_nav:
        draw.rectangle((0, h - frame.nav, w - 1, h - 1), fill=(242, 242, 246))
        draw.line((0, h - frame.nav, w, h - frame.nav), fill=(210, 210, 215), width=1)


def _draw_element(draw, e, screen):
    x0, y0, x1, y1 = e.box
    font_size = max(9, round(screen.height * 0.018))
    if e.kind == "row":
        draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=6, fill=(255, 255, 255), outline=(215, 215, 215))
        pad = round((y1 - y0) * 0.3)
        _text(draw, (x0 + pad, (y0 + y1) // 2), e.label, font_size, (30, 30, 30), x1 - x0 - 3 * pad, "left")
        _text(draw, (x1 - pad, (y0 + y1) // 2), ">", font_size, (160, 160, 160), pad, "centre")
    elif e.kind == "button":
        draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=(y1 - y0) // 2, fill=screen.app.accent)
        _text(draw, e.centre, e.label, font_size, (255, 255, 255), x1 - x0 - 12, "centre")
    elif e.kind == "tile":
        tint = tuple(round(c * 0.18 + 255 * 0.82) for c in screen.app.accent)
        draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=10, fill=tint)
        _text(draw, e.centre, e.label, font_size, (30, 30, 30), x1 - x0 - 10, "centre")
    elif e.region == "floating":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=ICON_COLOURS[e.colour])
        draw_icon(draw, e.kind, e.box, (255, 255, 255), ICON_COLOURS[e.colour])
    else:
        draw_icon(draw, e.kind, e.box, ICON_COLOURS[e.colour], (255, 255, 255))


def _text(draw, xy, text, size, fill, max_width, align):
    """Draw `text` vertically centred on xy[1], shrinking the font until it fits `max_width`."""
    font = _font(size)
    while size > 8 and draw.textlength(text, font=font) > max_width:
        size -= 1
        font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - left if align == "left" else xy[0] - (left + right) / 2
    draw.text((round(x), round(xy[1] - (top + bottom) / 2)), text, font=font, fill=fill)


def draw_icon(draw, kind, box, colour, hole):
    """Draw a simple glyph for `kind` in the middle of `box`; `hole` is the colour of cut-outs."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = min(x1 - x0, y1 - y0) * 0.3  # half the glyph size
    t = max(2, round(r / 3))  # stroke thickness
    if kind == "plus":
        draw.rectangle((cx - t / 2, cy - r, cx + t / 2, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - t / 2, cx + r, cy + t / 2), fill=colour)
    elif kind == "star":
        draw.polygon(_star_points(cx, cy, r), fill=colour)
    elif kind == "gear":
        draw.polygon(_gear_points(cx, cy, r), fill=colour)
        draw.ellipse((cx - r * 0.35, cy - r * 0.35, cx + r * 0.35, cy + r * 0.35), fill=hole)
    elif kind == "search":
        draw.ellipse((cx - r, cy - r, cx + r * 0.4, cy + r * 0.4), outline=colour, width=t)
        draw.line((cx + r * 0.25, cy + r * 0.25, cx + r, cy + r), fill=colour, width=t + 1)
    elif kind == "heart":
        draw.ellipse((cx - r, cy - r * 0.8, cx, cy + r * 0.2), fill=colour)
        draw.ellipse((cx, cy - r * 0.8, cx + r, cy + r * 0.2), fill=colour)
        draw.polygon([(cx - r * 0.97, cy - r * 0.15), (cx + r * 0.97, cy - r * 0.15), (cx, cy + r)], fill=colour)
    elif kind == "menu":
        for dy in (-r * 0.7, 0, r * 0.7):
            draw.rectangle((cx - r, cy + dy - t / 2, cx + r, cy + dy + t / 2), fill=colour)
    elif kind == "bell":
        draw.chord((cx - r * 0.7, cy - r, cx + r * 0.7, cy + r * 0.4), 180, 360, fill=colour)
        draw.polygon([(cx - r * 0.7, cy - r * 0.3), (cx + r * 0.7, cy - r * 0.3), (cx + r, cy + r * 0.6),
                      (cx - r, cy + r * 0.6)], fill=colour)
        draw.ellipse((cx - r * 0.25, cy + r * 0.55, cx + r * 0.25, cy + r), fill=colour)
    elif kind == "home":
        draw.polygon([(cx - r, cy - r * 0.1), (cx, cy - r), (cx + r, cy - r * 0.1)], fill=colour)
        draw.rectangle((cx - r * 0.7, cy - r * 0.1, cx + r * 0.7, cy + r), fill=colour)
        draw.rectangle((cx - r * 0.2, cy + r * 0.3, cx + r * 0.2, cy + r), fill=hole)
    elif kind == "triangle":
        draw.polygon([(cx - r * 0.7, cy - r), (cx + r, cy), (cx - r * 0.7, cy + r)], fill=colour)
    elif kind == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=colour)
    elif kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        raise ValueError(f"no drawing for icon kind {kind!r}")


def _star_points(cx, cy, r):
    return [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
             cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]


def _gear_points(cx, cy, r):
    # Eight teeth: the outline alternates between the tip radius and the root radius.
    points = []
    for i in range(32):
        radius = r if i % 4 in (0, 1) else r * 0.72
        angle = (i + 0.5) * 2 * math.pi / 32
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


# ---------------------------------------------------------------------------------------------
# Users and their commands
# ---------------------------------------------------------------------------------------------

@dataclass
class Profile:
    user: int
    habits: bool
    aliases: dict  # private word -> icon kind
    favourite_apps: list
    region_order: list  # which of two same-kind icons an ambiguous command means: first region wins


def user_rng(seed: int, user: int, purpose: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so streams are stable across runs and
    # platforms, unlike hash() of a string; one stream per purpose keeps them independent.
    return random.Random(f"pigg.synth/{seed}/{user}/{purpose}")


def make_profile(seed: int, user: int, habits: bool) -> Profile:
    if not habits:
        return Profile(user, False, {}, [], [])
    rng = user_rng(seed, user, "profile")
    # Word i maps to kind (offset_i + user) mod 8: any two users whose ids differ mod 8 disagree
    # on every word they share, and every user shares at least two of their three words.
    offsets = random.Random(f"pigg.synth/{seed}/aliases").sample(range(len(ALIAS_KINDS)), len(ALIAS_WORDS))
    words = sorted(rng.sample(range(len(ALIAS_WORDS)), 3))
    aliases = {ALIAS_WORDS[i]: ALIAS_KINDS[(offsets[i] + user) % len(ALIAS_KINDS)] for i in words}
    favourites = rng.sample(APP_NAMES, rng.randint(2, 3))
    return Profile(user, True, aliases, favourites, rng.sample(REGIONS, len(REGIONS)))


def choose_habit_users(seed: int, users: list, habit_fraction: float) -> set:
    """Exactly round(fraction * N) users, picked by a per-user draw so the choice is seeded, not positional."""
    n = int(habit_fraction * len(users) + 0.5)
    return set(sorted(users, key=lambda u: user_rng(seed, u, "habit").random())[:n])


def pick_app(rng: random.Random, profile: Profile) -> App:
    names = profile.favourite_apps if profile.habits and rng.random() < FAVOURITE_SHARE else APP_NAMES
    return APPS[APP_NAMES.index(rng.choice(names))]


def resolve(profile: Profile, screen: Screen, kind: str):
    """The element a habit user means by an icon kind: among same-kind icons, the favourite region's."""
    same = [e for e in screen.elements if e.kind == kind]
    if not same:
        return None
    return min(same, key=lambda e: profile.region_order.index(e.region))


def pick_command(rng: random.Random, screen: Screen, profile: Profile, taken: list):
    """(command, element) for one sample; `taken` elements already have a command on this screen."""
    if profile.habits:
        aliased = [(w, resolve(profile, screen, k)) for w, k in profile.aliases.items()]
        aliased = [(w, e) for w, e in aliased if e is not None and e not in taken]
        if aliased and rng.random() < 0.5:
            word, target = rng.choice(aliased)
            template = rng.choice(("tap {}", "open {}", "{}, please", "hit {}", "press {}", "go to {}"))
            return template.format(word), target
        doubles = sorted({e.kind for e in screen.elements if e.is_icon and _twins(screen, e)})
        doubles = [k for k in doubles if resolve(profile, screen, k) not in taken]
        if doubles and rng.random() < 0.5:
            kind = rng.choice(doubles)
            return _kind_command(rng, screen, kind), resolve(profile, screen, kind)
    target = rng.choice([e for e in screen.elements if e not in taken])
    return plain_command(rng, screen, target), target


def _twins(screen, e):
    return [o for o in screen.elements if o is not e and o.kind == e.kind]


def _kind_command(rng, screen, kind):
    """A command that names only the kind of icon: ambiguous when the screen has two of them."""
    options = [f"tap the {kind}", f"press the {kind} icon"]
    options += [p.format(thing=screen.app.new_thing) for p in ICON_PHRASES.get(kind, ())]
    return rng.choice(options)


def plain_command(rng: random.Random, screen: Screen, e: Element) -> str:
    """A command that fits exactly one element on the screen, whoever says it."""
    if e.kind == "button":
        if rng.random() < 0.4:
            return e.phrase
        return rng.choice(("Tap the {} button", "Press {}", "Tap {}", "Click {}")).format(e.label)
    if e.kind == "row":
        return rng.choice(("Open {}", "Tap {}", "Select {}", "Show {}")).format(e.label)
    if e.kind == "tile":
        return rng.choice(("Open {}", "Tap the {} tile", "Show me {}")).format(e.label)
    if e.kind in ICON_PHRASES and not _twins(screen, e) and rng.random() < 0.5:
        return rng.choice(ICON_PHRASES[e.kind]).format(thing=screen.app.new_thing)
    return rng.choice(("Tap the {}", "Press the {}", "Click the {}", "Hit the {}")).format(e.description)


def relative_point(e: Element, width: int, height: int) -> tuple:
    cx, cy = e.centre
    return (min(1000, max(0, int(round(cx / width * 1000)))), min(1000, max(0, int(round(cy / height * 1000)))))


def make_sample(image: str, command: str, e: Element, width: int, height: int) -> list:
    x, y = relative_point(e, width, height)
    return [
        {"role": "system",
         "content": [{"type": "image", "image": image}, {"type": "text", "text": make_prompt(command)}]},
        {"role": "assistant", "content": [{"type": "text", "text": format_answer(e.description, x, y)}]},
    ]


def synthesize_user(out_dir: Path, profile: Profile, n_samples: int, seed: int, width: int, height: int):
    """Write one user's screenshots; return its samples and how many screens each app got."""
    rng = user_rng(seed, profile.user, "samples")
    image_dir = out_dir / "images" / f"user_{profile.user}"
    image_dir.mkdir(parents=True, exist_ok=True)
    samples, app_counts = [], {}
    while len(samples) < n_samples:
        app = pick_app(rng, profile)
        must = rng.choice(sorted(profile.aliases.values())) if profile.habits and rng.random() < 0.6 else None
        screen = build_screen(rng, app, width, height, must)
        name = f"{sum(app_counts.values()):05d}.png"
        render(screen).save(image_dir / name, format="PNG")
        app_counts[app.name] = app_counts.get(app.name, 0) + 1
        taken = []
        for _ in range(min(rng.choice((1, 2, 2, 3)), n_samples - len(samples))):
            command, target = pick_command(rng, screen, profile, taken)
            taken.append(target)
            samples.append(make_sample(f"images/user_{profile.user}/{name}", command, target, width, height))
    return samples, app_counts


def _user_ids(users) -> list:
    ids = list(range(1, users + 1)) if isinstance(users, int) else list(users)
    bad = [u for u in ids if isinstance(u, bool) or not isinstance(u, int) or u < 0]
    if bad or len(set(ids)) != len(ids) or not ids:
        raise ValueError(f"users must be a positive count or distinct non-negative int ids, got {users!r}")
    return ids


def synthesize(out_dir, users, samples_per_user: int | dict = 40, seed: int = 0, width: int = 360, height: int = 800,
               habit_fraction: float = 0.5) -> list:
    """Write `user_{id}.pkl`, `images/user_{id}/*.png` and `users.json` under out_dir; return the pickle paths.

    `samples_per_user` is a count for every user or {user: count}; each user gets that count +-25%."""
    ids = _user_ids(users)
    counts = samples_per_user if isinstance(samples_per_user, dict) else dict.fromkeys(ids, samples_per_user)
    if set(counts) != set(ids):
        raise ValueError(f"samples_per_user names users {sorted(counts)}, not the users {ids}")
    if min(counts.values()) < 1 or width < 120 or height < 240 or not 0 <= habit_fraction <= 1:
        raise ValueError(f"need samples_per_user >= 1, width >= 120, height >= 240, 0 <= habit_fraction <= 1; got "
                         f"{samples_per_user}, {width}, {height}, {habit_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    habit_users = choose_habit_users(seed, ids, habit_fraction)
    paths, summary = [], {}
    for user in ids:
        profile = make_profile(seed, user, user in habit_users)
        spread = counts[user] // 4
        n = max(1, counts[user] + user_rng(seed, user, "count").randint(-spread, spread))
        samples, app_counts = synthesize_user(out_dir, profile, n, seed, width, height)
        path = out_dir / f"user_{user}.pkl"
        with open(path, "wb") as f:
            pickle.dump(samples, f, protocol=4)
        paths.append(path)
        summary[str(user)] = {"habits": profile.habits, "aliases": profile.aliases,
                              "favourite_apps": profile.favourite_apps, "region_order": profile.region_order,
                              "samples": n, "app_counts": dict(sorted(app_counts.items()))}
    (out_dir / "users.json").write_text(json.dumps(summary, indent=1) + "\n")
    return paths
