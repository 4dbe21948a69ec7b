"""Compiled (numba) inner loops of the synthetic world: the street-level renderer, the image
finish, and the city's shadow sweeps, resampling and tree crowns.

``render.py`` and ``city.py`` decide what to draw; these loops do the per column, per pixel and
per cell work that numpy would spread over dozens of full-raster passes.

Each column is marched over fixed radii. The running maximum of ``(height - eye) / radius`` along
the column is its horizon profile, non-decreasing with the radius, so the sample that each row's
ray stops at (the first one whose horizon reaches the ray's elevation) falls out of one sweep
down the rows. Ground hits are then re-coloured at the ray's exact ground intersection, which
keeps road edges and markings sharp; facade hits get floors, windows, sun and the shadow line of
the street in front.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Material codes of cvig_engine.synth.city; ground materials are those <= _MARKING.
_GRASS, _ROAD, _MARKING, _BUILDING, _TREE, _VEHICLE = 0, 3, 4, 5, 6, 7

# cache=True: compiled once per machine (next to this file), not once per process.
_COMPILE = dict(cache=True, nogil=True)


@numba.njit(**_COMPILE)
def _pixel(x, y, half, resolution, size):
    """Raster (row, column) of world point (x, y), clipped to the raster (as City.to_pixel)."""
    column = min(max(int(math.floor((x + half) / resolution)), 0), size - 1)
    row = min(max(int(math.floor((half - y) / resolution)), 0), size - 1)
    return row, column


@numba.njit(**_COMPILE)
def _cell(x, y, half, resolution, size):
    """Flat raster index of world point (x, y), clipped to the raster."""
    row, column = _pixel(x, y, half, resolution, size)
    return row * size + column


@numba.njit(**_COMPILE)
def street_pixels(
    x, y, eye, sin_az, cos_az, tilt, elevation, radii,
    height_map, material_map, colour_index_map, texture_map, shadow_map, road_map, object_map,
    half, resolution, size,
    building_rects, window_spacing, floor_height, city_cos, city_sin,
    table, ambient, light, sun_sine, sun_east, sun_north, sun_facade,
    haze, haze_distance, glass,
    sky_horizon, sky_zenith, sky_top, clouds, cloud_columns, cloud_cover, cloud_colour,
):  # fmt: skip
    """Street view at world (x, y): linear colours [H, W, 3], building and road masks [H, W],
    and each pixel's hit distance (inf where the ray escapes).

    Column j looks along (sin_az[j], cos_az[j]) (east, north); row t at elevation
    ``elevation[t] + tilt[j]`` (radians). ``*_map`` are the city's flat raster layers
    (``shadow_map`` for this photo's sun), ``table`` the street colour of each colour index.
    """
    rows, width, steps = elevation.shape[0], sin_az.shape[0], radii.shape[0]
    image = np.empty((rows, width, 3), np.float32)
    building = np.zeros((rows, width), np.bool_)
    road = np.zeros((rows, width), np.bool_)
    distance = np.empty((rows, width), np.float32)
    cells = np.empty(steps, np.int64)
    horizon = np.empty(steps, np.float64)  # running max of (height - eye) / radius: a tangent
    colour = np.empty(3, np.float64)
    lit = np.empty(3, np.float64)
    fade = np.exp(-radii.astype(np.float64) / haze_distance)
    tan_elevation = np.tan(elevation.astype(np.float64))
    camera_u = x * city_cos + y * city_sin
    camera_v = -x * city_sin + y * city_cos
    facing, window_column, front_shadow = 0.0, False, 0.0  # of the prepared facade sample
    for j in range(width):
        running = -np.inf
        for k in range(steps):
            cell = _cell(x + sin_az[j] * radii[k], y + cos_az[j] * radii[k], half, resolution, size)
            cells[k] = cell
            running = max(running, (height_map[cell] - eye) / radii[k])
            horizon[k] = running
        tan_tilt = math.tan(tilt[j])
        hit = steps  # rows from the top down stop at ever nearer samples
        prepared = -1
        for t in range(rows):
            # tan(elevation + tilt): the ray passes sample k while this exceeds horizon[k].
            tan_ray = (tan_elevation[t] + tan_tilt) / (1.0 - tan_elevation[t] * tan_tilt)
            while hit > 0 and horizon[hit - 1] >= tan_ray:
                hit -= 1
            ray = elevation[t] + tilt[j]
            if hit == steps:
                distance[t, j] = np.inf
                if ray > 0.0:
                    blend = min(max(ray / sky_top, 0.0), 1.0) ** 0.6
                    cloud = clouds[t, cloud_columns[j]] * cloud_cover
                    for c in range(3):
                        sky = sky_horizon[c] * (1.0 - blend) + sky_zenith[c] * blend
                        image[t, j, c] = sky * (1.0 - cloud) + cloud_colour[c] * cloud
                else:
                    for c in range(3):
                        image[t, j, c] = haze[c]
                continue
            cell = cells[hit]
            material = material_map[cell]
            radius = radii[hit]
            if hit != prepared:  # the sample's own colour, light and haze
                prepared = hit
                texture = 1.0 + 0.1 * texture_map[cell]
                if material <= _MARKING:
                    direct = sun_sine
                elif material == _TREE:
                    direct = 0.6
                else:
                    direct = 0.7
                if shadow_map[cell] > height_map[cell] + 0.05:
                    direct = 0.0
                for c in range(3):
                    colour[c] = table[colour_index_map[cell], c] * texture
                    lit[c] = ((ambient[c] + direct * light[c]) * colour[c] * fade[hit]
                              + haze[c] * (1.0 - fade[hit]))
                if material == _BUILDING:
                    point_x, point_y = x + sin_az[j] * radius, y + cos_az[j] * radius
                    u = point_x * city_cos + point_y * city_sin
                    v = -point_x * city_sin + point_y * city_cos
                    obj = object_map[cell]
                    distance_u = min(abs(u - building_rects[obj, 0]),
                                     abs(u - building_rects[obj, 1]))
                    distance_v = min(abs(v - building_rects[obj, 2]),
                                     abs(v - building_rects[obj, 3]))
                    # The face hit is the footprint edge nearest the sample; it faces the camera.
                    normal_u, normal_v = 0.0, 0.0
                    if distance_u < distance_v:
                        normal_u = np.sign(camera_u - u)
                    else:
                        normal_v = np.sign(camera_v - v)
                    normal_x = normal_u * city_cos - normal_v * city_sin
                    normal_y = normal_u * city_sin + normal_v * city_cos
                    facing = min(max(normal_x * sun_east + normal_y * sun_north, 0.0), 1.0)
                    facing *= sun_facade
                    along = (u + v) / window_spacing[obj]
                    along -= math.floor(along)
                    window_column = 0.25 < along < 0.75
                    front_shadow = shadow_map[cells[hit - 1]] if hit > 0 else shadow_map[cell]
            distance[t, j] = radius
            for c in range(3):
                image[t, j, c] = lit[c]
            road[t, j] = road_map[cell] and material != _VEHICLE and material != _TREE
            if material == _BUILDING:
                building[t, j] = True
                z = eye + radius * tan_ray
                floor = z / floor_height
                floor -= math.floor(floor)
                window = window_column and 0.35 < floor < 0.8 and z > 0.5
                sunlit = facing if z >= front_shadow - 0.05 else 0.0
                for c in range(3):
                    base = glass[c] if window else colour[c]
                    image[t, j, c] = ((ambient[c] + sunlit * light[c]) * base * fade[hit]
                                      + haze[c] * (1.0 - fade[hit]))
            elif material <= _MARKING and ray < 0.0:
                exact = -eye / tan_ray
                nearer = radii[hit - 1] if hit > 0 else radii[0]
                exact = min(max(exact, nearer), radius)
                ground = _cell(x + sin_az[j] * exact, y + cos_az[j] * exact,
                               half, resolution, size)
                if material_map[ground] <= _MARKING:  # not just inside an object
                    direct = sun_sine if shadow_map[ground] <= 0.05 else 0.0
                    ground_fade = math.exp(-exact / haze_distance)
                    scale = (1.0 + 0.1 * texture_map[ground]) * ground_fade
                    for c in range(3):
                        image[t, j, c] = ((ambient[c] + direct * light[c])
                                          * table[colour_index_map[ground], c] * scale
                                          + haze[c] * (1.0 - ground_fade))
                    road[t, j] = road_map[ground]
    return image, building, road, distance


@numba.njit(**_COMPILE)
def finish_image(image, gain, blur, noise, noise_scale, wrap):
    """Gain per channel, 5-point blur, sensor noise, 8-bit quantisation: one pass, uint8 out.

    blurred = (1 - blur) * centre + blur / 4 * (up + down + left + right), borders repeated (the
    width wraps around for 360 deg panoramas); ``noise`` is [H, W, 3] or empty for none.
    """
    rows, width = image.shape[0], image.shape[1]
    out = np.empty((rows, width, 3), np.uint8)
    add_noise = noise.size > 0
    for t in range(rows):
        up, down = max(t - 1, 0), min(t + 1, rows - 1)
        for j in range(width):
            left, right = j - 1, j + 1
            if wrap:
                left, right = left % width, right % width
            else:
                left, right = max(left, 0), min(right, width - 1)
            for c in range(3):
                value = image[t, j, c]
                if blur > 0.0:
                    around = (image[up, j, c] + image[down, j, c]
                              + image[t, left, c] + image[t, right, c])
                    value = (1.0 - blur) * value + blur / 4.0 * around
                value *= gain[c]
                if add_noise:
                    value += noise[t, j, c] * noise_scale
                value = min(max(value + 0.5, 0.0), 255.0)
                out[t, j, c] = np.uint8(value)
    return out


@numba.njit(**_COMPILE)
def shadow_sweep(height, transpose, flip, offsets, drop):
    """The row-by-row recurrence of ``city.shadow_heights`` in place of numpy's per-row passes.

    In sweep coordinates (``height`` transposed and/or with its sweep axis reversed, as flagged):
    S[0] = H[0], S[i] = max(H[i], S[i - 1] shifted by offsets[i] - offsets[i - 1] columns - drop),
    columns shifted in from outside being 0. Returned in ``height``'s own layout.
    """
    result = np.empty_like(height)
    rows = height.shape[1] if transpose else height.shape[0]
    columns = height.shape[0] if transpose else height.shape[1]
    for i in range(rows):
        row = rows - 1 - i if flip else i
        before = row + 1 if flip else row - 1
        step = offsets[i] - offsets[i - 1] if i > 0 else 0
        for column in range(columns):
            value = height[column, row] if transpose else height[row, column]
            if i > 0:
                source = column + 1 if step > 0 else (column - 1 if step < 0 else column)
                previous = np.float32(0.0)
                if 0 <= source < columns:
                    previous = result[source, before] if transpose else result[before, source]
                value = max(value, previous - drop)
            if transpose:
                result[column, row] = value
            else:
                result[row, column] = value
    return result


@numba.njit(**_COMPILE)
def resample_layers(x, y, cos_a, sin_a, extent, resolution, count,
                    height, material, object_id, road, overhead_vehicle):  # fmt: skip
    """Nearest-neighbour resampling of five flat city-frame layers (count x count, rotated by the
    city angle) onto the world raster whose pixel centres are x (columns) and y (rows).

    A world pixel takes the frame cell holding its centre: column floor((u + extent) / resolution)
    and row floor((extent - v) / resolution), clipped, with (u, v) the centre in the city frame.
    """
    size = x.shape[0]
    out_height = np.empty((size, size), height.dtype)
    out_material = np.empty((size, size), material.dtype)
    out_object = np.empty((size, size), object_id.dtype)
    out_road = np.empty((size, size), road.dtype)
    out_vehicle = np.empty((size, size), overhead_vehicle.dtype)
    last = count - 1
    for row in range(size):
        for column in range(size):
            u = x[column] * cos_a + y[row] * sin_a
            v = -x[column] * sin_a + y[row] * cos_a
            frame_column = min(max(math.floor((u + extent) / resolution), 0), last)
            frame_row = min(max(math.floor((extent - v) / resolution), 0), last)
            cell = int(frame_row) * count + int(frame_column)
            out_height[row, column] = height[cell]
            out_material[row, column] = material[cell]
            out_object[row, column] = object_id[cell]
            out_road[row, column] = road[cell]
            out_vehicle[row, column] = overhead_vehicle[cell]
    return out_height, out_material, out_object, out_road, out_vehicle


@numba.njit(**_COMPILE)
def plant_crowns(x, y, radii, heights, resolution, half, height, material, object_id,
                 building_code, tree_code):  # fmt: skip
    """Rasterise tree crowns (domes, solid down to the ground) into the world layers, in order.

    Tree i (centre x[i], y[i], radius radii[i], top heights[i]) takes every cell whose centre is
    within its radius, that is no building and that is lower than its dome
    heights[i] * (0.35 + 0.65 * sqrt(1 - (d / r)^2)); its object id is i.
    """
    size = height.shape[0]
    for ident in range(x.shape[0]):
        radius = radii[ident]
        row_centre, column_centre = _pixel(x[ident], y[ident], half, resolution, size)
        reach = int(math.ceil(radius / resolution)) + 1
        for row in range(max(row_centre - reach, 0), min(row_centre + reach + 1, size)):
            cell_y = half - (row + 0.5) * resolution
            for column in range(max(column_centre - reach, 0),
                                min(column_centre + reach + 1, size)):
                cell_x = (column + 0.5) * resolution - half
                distance2 = ((cell_x - x[ident]) ** 2 + (cell_y - y[ident]) ** 2) / (
                    radius * radius)
                crown = math.sqrt(min(max(1.0 - distance2, 0.0), 1.0))
                dome = np.float32(heights[ident] * (0.35 + 0.65 * crown))
                if (distance2 < 1.0 and material[row, column] != building_code
                        and dome > height[row, column]):
                    height[row, column] = dome
                    material[row, column] = tree_code
                    object_id[row, column] = ident


@numba.njit(**_COMPILE)
def overhead_colours(material, object_id, overhead_vehicle, texture, amplitude, table, roof_start,
                     crown_start, vehicle_start, crown_light, shadow, season_ratio):  # fmt: skip
    """The overhead colour image [N, N, 3] and its vegetation mask, one pass over the raster.

    Per cell: the colour-table entry of its material (roofs, crowns and the vehicles present at
    the overhead's time by object id; parked street vehicles read as road), times a texture
    factor 1 + amplitude * texture, darkened on roof edges (0.78), lit on crowns
    (0.55 + 0.6 * crown_light, in the row-major order of the tree cells), halved in shadow, and
    grass and crowns tinted by the season. float32 throughout.
    """
    size = material.shape[0]
    image = np.empty((size, size, 3), np.float32)
    vegetation = np.empty((size, size), np.bool_)
    tree_cell = 0
    for row in range(size):
        for column in range(size):
            code = material[row, column]
            if code == _VEHICLE:
                code = _ROAD
            index = np.int64(code)
            if code == _BUILDING:
                index = roof_start + object_id[row, column]
            elif code == _TREE:
                index = crown_start + object_id[row, column]
            elif overhead_vehicle[row, column] >= 0:
                index = vehicle_start + overhead_vehicle[row, column]
            factor = np.float32(1.0) + amplitude[code] * texture[row, column]
            if (code == _BUILDING and 0 < row < size - 1 and 0 < column < size - 1
                    and not (_is_building(material[row - 1, column])
                             and _is_building(material[row + 1, column])
                             and _is_building(material[row, column - 1])
                             and _is_building(material[row, column + 1]))):
                factor *= np.float32(0.78)  # roof edge: a parapet outline
            if code == _TREE:
                factor *= np.float32(0.55) + np.float32(0.6) * crown_light[tree_cell]
                tree_cell += 1
            if shadow[row, column]:
                factor *= np.float32(0.5)
            green = code == _GRASS or code == _TREE
            vegetation[row, column] = green
            for channel in range(3):
                value = table[index, channel] * factor
                image[row, column, channel] = value * season_ratio[channel] if green else value
    return image, vegetation


@numba.njit(inline="always", cache=True)
def _is_building(code):  # pragma: no cover - compiled
    return code == _BUILDING
